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
``rank(Attempt) -> [Candidate]``. Each round adds twice as many nodes to those in float as the round
before (1, 3, 7, 15, ... in float), the last allowed round keeps every sensitive node (the worst ``max_excluded`` fraction)
in float; if the gate still fails the caller reports it, nothing is written.

Measured rounds, when the SQNR rounds fail: a tensor's SQNR says how much rounding a node adds, not how much
of it reaches the output. On the digit transformer (ONNX Runtime, 47 quantized nodes) the SQNR order missed
the gate even with 23 nodes in float (worst-feed cosine 0.931), while the rounding that matters is small and
late or early: the last MLP's fc2 (its GELU input is heavy-tailed) and the patch embedding, whose input at low
noise levels is nearly the clean latent, so input rounding reaches the predicted noise directly. Float math
on the same QDQ graph gave the same cosine, so no kernel was at fault. ``measure(Attempt)`` scores a graph by
its worst-feed output SQNR against fp32 on a few *calibration* feeds (the held-out set only gates); every
node is scored alone in float (one quantization each), and the rounds run again in the order of that gain:
8 nodes in float gave 0.9904.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .data import FeedSet


RANK_FEEDS = 2  # feeds of each set used for ranking: it only needs a stable order of the nodes
MEASURE_FEEDS = 8  # calibration feeds the measured rounds score whole graphs on


def rank_feeds(calib, held) -> list[dict]:
    """The feeds sensitivity is measured on: a few calibration and a few held-out ones."""
    return calib.feeds[:RANK_FEEDS] + held.feeds[:RANK_FEEDS]


def measure_set(calib: FeedSet, count: int = MEASURE_FEEDS) -> FeedSet:
    """``count`` calibration feeds spread evenly over the set: a transformer's are recorded along sampling
    trajectories, so its first feeds are all at high noise, where quantization barely shows."""
    picks = np.unique(np.linspace(0, len(calib.feeds) - 1, min(count, len(calib.feeds))).round().astype(int))
    return FeedSet(calib.graph, "measure", [calib.feeds[i] for i in picks], calib.source)


@dataclass
class Candidate:
    node: str            # the name the backend's exclusion list takes
    op_type: str
    sqnr_db: float       # lowest SQNR among the tensors this node quantizes
    tensor: str          # ... and which tensor that was
    label: str = ""      # human hint: weight name, role
    output_sqnr_db: float | None = None    # measured rounds: the graph's worst-feed output SQNR with this node alone in float
    all_int8_sqnr_db: float | None = None  # ... and with every node in INT8

    def reason(self) -> str:
        if self.output_sqnr_db is not None:
            return (f"output SQNR {self.output_sqnr_db:.2f} dB with it alone in float "
                    f"(all INT8: {self.all_int8_sqnr_db:.2f} dB)")
        return f"SQNR {self.sqnr_db:.1f} dB at {self.tensor}"

    def to_dict(self) -> dict:
        d = {**asdict(self), "sqnr_db": round(self.sqnr_db, 2), "reason": self.reason()}
        for k in ("output_sqnr_db", "all_int8_sqnr_db"):
            if d[k] is None:
                del d[k]
            else:
                d[k] = round(d[k], 3)
        return d


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
                          max_rounds: int = 6, max_excluded: float = 0.5,
                          measure: Callable[[Attempt], float] | None = None, measure_budget_s: float = 1800) -> Outcome:
    t = time.perf_counter()
    attempt = quantize([])
    gate = evaluate(attempt)
    rounds = [{"round": 0, "excluded": 0, "gate": gate, "seconds": round(time.perf_counter() - t, 1)}]
    print(f"    round 0 (all quantizable nodes in INT8): {describe(gate)}", flush=True)
    if gate["pass"]:
        return Outcome(attempt, gate, [], [], rounds)
    ranking = rank(attempt)
    worst = ", ".join(f"{c.node} ({c.sqnr_db:.1f} dB)" for c in ranking[:5])
    print(f"    sensitivity: {len(ranking)} quantized nodes, worst: {worst}", flush=True)
    # a trim round costs about what round 0 did: skipped where that would not fit the budget (paper size)
    trim = 0 < measure_budget_s and rounds[0]["seconds"] * 3 <= measure_budget_s
    outcome = _exclusion_rounds(quantize, evaluate, describe, attempt, ranking, rounds, max_rounds, max_excluded, trim=trim)
    if outcome.gate["pass"] or measure is None or not ranking or max_rounds < 1:
        return outcome
    # one quantization per node, each about as long as round 0 took
    estimate = rounds[0]["seconds"] * len(ranking)
    if measure_budget_s <= 0 or estimate > measure_budget_s:
        print(f"    measured rounds skipped: scoring {len(ranking)} nodes one at a time would take about "
              f"{estimate / 60:.0f} min (budget {measure_budget_s / 60:.0f} min, --measure-minutes)", flush=True)
        return outcome
    outcome.attempt.release()
    attempt = quantize([])
    measured = measured_ranking(quantize, measure, ranking, attempt)
    return _exclusion_rounds(quantize, evaluate, describe, attempt, measured, outcome.rounds, max_rounds, max_excluded,
                             mode="measured exclusion rounds", gate=rounds[0]["gate"], trim=True)


def measured_ranking(quantize: Callable[[list[str]], Attempt], measure: Callable[[Attempt], float],
                     ranking: list[Candidate], all_int8_attempt: Attempt) -> list[Candidate]:
    """Every node scored alone in float (the graph's output SQNR vs fp32), best gain first."""
    from tqdm import tqdm

    all_int8 = measure(all_int8_attempt)
    all_int8_attempt.release()
    scored = []
    for c in tqdm(ranking, desc="    scoring each node alone in float", leave=False, disable=None):
        attempt = quantize([c.node])
        scored.append(Candidate(c.node, c.op_type, c.sqnr_db, c.tensor, c.label, measure(attempt), all_int8))
        attempt.release()
    scored.sort(key=lambda c: -c.output_sqnr_db)
    best = ", ".join(f"{c.node} ({c.output_sqnr_db:.2f} dB)" for c in scored[:5])
    print(f"    measured: output SQNR {all_int8:.2f} dB with every node in INT8; best alone in float: {best}", flush=True)
    return scored


def _exclusion_rounds(quantize, evaluate, describe, attempt: Attempt, ranking: list[Candidate], rounds: list[dict],
                      max_rounds: int, max_excluded: float, mode: str = "exclusion rounds", gate: dict | None = None,
                      trim: bool = False) -> Outcome:
    """Keep the first 1, 3, 7, ... nodes of ``ranking`` in float (the last round: all it may) until the gate holds;
    with ``trim``, then bisect between the last failing and the passing count for the fewest nodes in float that
    pass (the digit transformer's measured rounds passed with 15 after 7 had failed)."""
    gate = gate or rounds[-1]["gate"]
    excluded: list[Candidate] = []
    limit = math.floor(max_excluded * len(ranking))
    step, failed = 1, 0  # failed: the most nodes in float known to miss the gate
    for r in range(1, max_rounds + 1):
        room = limit - len(excluded)
        if gate["pass"] or room <= 0:
            break
        failed = len(excluded)
        take = room if r == max_rounds else min(step, room)  # the last round tries every sensitive node in float
        excluded += ranking[len(excluded):len(excluded) + take]
        step *= 2
        t = time.perf_counter()
        attempt.release()  # not run again: free its compiled graph before the next quantization
        attempt = quantize([c.node for c in excluded])
        gate = evaluate(attempt)
        label = r if mode == "exclusion rounds" else f"measured {r}"
        rounds.append({"round": label, "excluded": len(excluded), "gate": gate, "seconds": round(time.perf_counter() - t, 1)})
        print(f"    round {label} ({len(excluded)} nodes in float): {describe(gate)}", flush=True)
    while trim and gate["pass"] and len(excluded) - failed > 1:
        mid = (failed + len(excluded)) // 2
        t = time.perf_counter()
        attempt.release()  # compiled again on demand if it stays the answer
        candidate = quantize([c.node for c in ranking[:mid]])
        g = evaluate(candidate)
        rounds.append({"round": f"trim {mid}", "excluded": mid, "gate": g, "seconds": round(time.perf_counter() - t, 1)})
        print(f"    round trim ({mid} nodes in float): {describe(g)}", flush=True)
        if g["pass"]:
            attempt, gate, excluded = candidate, g, excluded[:mid]
        else:
            candidate.release()
            failed = mid
    return Outcome(attempt, gate, excluded, ranking, rounds, mode=mode)


def failure_message(graph: str, outcome: Outcome, describe: Callable[[dict], str], max_rounds: int,
                    max_excluded: float) -> str:
    n = len(outcome.ranking)
    limit = math.floor(max_excluded * n)
    measured = outcome.mode.startswith("measured")
    if outcome.mode not in ("exclusion rounds", "measured exclusion rounds"):
        why = f"after {outcome.mode} kept {len(outcome.excluded)} nodes in float"
    elif len(outcome.excluded) >= limit:
        which = "most damaging (measured at the output)" if measured else "most sensitive"
        why = f"even with the {len(outcome.excluded)} {which} of {n} quantized nodes in float (--max-excluded {max_excluded})"
    else:
        why = f"after {max_rounds} rounds with {len(outcome.excluded)} nodes in float (--max-rounds)"
    kept = "; ".join(f"{c.node} {c.reason()}" for c in outcome.excluded[:8])
    return (f"{graph} INT8 misses its gate {why}: {describe(outcome.gate)}"
            + (f". Kept in float: {kept}" + (" ..." if len(outcome.excluded) > 8 else "") if kept else "")
            + ". Relax the gate flag, raise --max-excluded, or try --method percentile/entropy.")
