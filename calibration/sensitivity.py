"""Which quantized nodes stay in float: measure, then exclude the most damaging until the gate holds.

Damage of a node = the lowest SQNR (dB) among the tensors its quantization rounds (input and
output activations, weights), measured by running the quantized graph with every fake-quantized
tensor exposed next to its float value, on a few calibration feeds (rounding noise) *and* a few
held-out feeds: ranges fitted on the calibration set never clip it, so only unseen data reveals
the nodes whose activations overflow their range (measured: with 4 calibration crops, ranking on
calibration data alone kept 19 of 39 encoder nodes in float for no gain). The expected suspects in DC-AE are
the linear-attention products (sums over every token), the latent interfaces (encoder last conv,
decoder first conv) and the final RGB conv; the measurement finds them rather than assuming them.

The loop is backend-agnostic: ``quantize(excluded) -> Attempt``, ``evaluate(Attempt) -> gate``,
``rank(Attempt) -> [Candidate]``. Round r keeps twice as many nodes in float as round r-1 (1, 2,
4, ...), the last allowed round keeps every sensitive node (the worst ``max_excluded`` fraction)
in float; if the gate still fails the caller reports it, nothing is written.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable


RANK_FEEDS = 2  # feeds of each set used for ranking: it only needs a stable order of the nodes


def rank_feeds(calib, held) -> list[dict]:
    """The feeds sensitivity is measured on: a few calibration and a few held-out ones."""
    return calib.feeds[:RANK_FEEDS] + held.feeds[:RANK_FEEDS]


@dataclass
class Candidate:
    node: str            # the name the backend's exclusion list takes
    op_type: str
    sqnr_db: float       # lowest SQNR among the tensors this node quantizes
    tensor: str          # ... and which tensor that was
    label: str = ""      # human hint: weight name, role

    def reason(self) -> str:
        return f"SQNR {self.sqnr_db:.1f} dB at {self.tensor}"

    def to_dict(self) -> dict:
        return {**asdict(self), "sqnr_db": round(self.sqnr_db, 2), "reason": self.reason()}


@dataclass
class Attempt:
    """One quantization of a graph: how to run it, what to save, what it holds."""
    run: Callable
    counts: dict
    excluded: list[str]
    handle: object = None     # backend-specific: a path, an ov.Model, an MLModel
    extra: dict = field(default_factory=dict)

    def release(self) -> None:
        """Drop what ``run`` compiled, if it can compile again on its next call (CompiledOnDemand): at paper
        size each compiled graph holds its weights once more while the next attempt is quantized."""
        getattr(self.run, "release", lambda: None)()


class CompiledOnDemand:
    """A runner compiled on its first call by ``make()`` (-> feeds -> outputs), and again after release()."""

    def __init__(self, make: Callable[[], Callable]):
        self.make, self._run = make, None

    def __call__(self, feeds):
        if self._run is None:
            self._run = self.make()
        return self._run(feeds)

    def release(self) -> None:
        self._run = None


@dataclass
class Outcome:
    attempt: Attempt
    gate: dict
    excluded: list[Candidate]
    ranking: list[Candidate]
    rounds: list[dict]
    seconds: float = 0.0
    mode: str = "exclusion rounds"   # or how else the float nodes were chosen


def keep_float_until_gate(quantize: Callable[[list[str]], Attempt], evaluate: Callable[[Attempt], dict],
                          rank: Callable[[Attempt], list[Candidate]], describe: Callable[[dict], str],
                          max_rounds: int = 6, max_excluded: float = 0.5) -> Outcome:
    t = time.perf_counter()
    attempt = quantize([])
    gate = evaluate(attempt)
    rounds = [{"round": 0, "excluded": 0, "gate": gate, "seconds": round(time.perf_counter() - t, 1)}]
    print(f"    round 0 (all quantizable nodes in INT8): {describe(gate)}", flush=True)
    excluded: list[Candidate] = []
    ranking: list[Candidate] = []
    step = 1
    for r in range(1, max_rounds + 1):
        if gate["pass"]:
            break
        if not ranking:
            ranking = rank(attempt)
            worst = ", ".join(f"{c.node} ({c.sqnr_db:.1f} dB)" for c in ranking[:5])
            print(f"    sensitivity: {len(ranking)} quantized nodes, worst: {worst}", flush=True)
        limit = math.floor(max_excluded * len(ranking))
        todo = [c for c in ranking if c.node not in {e.node for e in excluded}]
        room = limit - len(excluded)
        if room <= 0 or not todo:
            break
        take = room if r == max_rounds else min(step, room)  # the last round tries every sensitive node in float
        excluded += todo[:take]
        step *= 2
        t = time.perf_counter()
        attempt.release()  # not run again: free its compiled graph before the next quantization
        attempt = quantize([c.node for c in excluded])
        gate = evaluate(attempt)
        rounds.append({"round": r, "excluded": len(excluded), "gate": gate, "seconds": round(time.perf_counter() - t, 1)})
        print(f"    round {r} ({len(excluded)} nodes in float): {describe(gate)}", flush=True)
    return Outcome(attempt, gate, excluded, ranking, rounds)


def failure_message(graph: str, outcome: Outcome, describe: Callable[[dict], str], max_rounds: int,
                    max_excluded: float) -> str:
    n = len(outcome.ranking)
    limit = math.floor(max_excluded * n)
    if outcome.mode != "exclusion rounds":
        why = f"after {outcome.mode} kept {len(outcome.excluded)} nodes in float"
    elif len(outcome.excluded) >= limit:
        why = f"even with the {len(outcome.excluded)} most sensitive of {n} quantized nodes in float (--max-excluded {max_excluded})"
    else:
        why = f"after {max_rounds} rounds with {len(outcome.excluded)} nodes in float (--max-rounds)"
    kept = "; ".join(f"{c.node} {c.reason()}" for c in outcome.excluded[:8])
    return (f"{graph} INT8 misses its gate {why}: {describe(outcome.gate)}"
            + (f". Kept in float: {kept}" + (" ..." if len(outcome.excluded) > 8 else "") if kept else "")
            + ". Relax the gate flag, raise --max-excluded, or try --method percentile/entropy.")
