"""INT8-calibrate a bundle's graphs for one backend from real data, behind quality gates.

    python -m calibration --bundle exports/f64 --backend onnxruntime
    python -m calibration --bundle exports/f64 --backend openvino --graphs vae_decoder --max-drop 0.3
    python -m calibration --bundle exports/f64 --backend coreml --palettize 6

Adds ``<graph>/model_int8.onnx`` ("onnx/int8"), ``<graph>/openvino_model_int8.xml/.bin``
("openvino/int8") or ``<graph>/model_int8w.mlpackage`` ("coreml/int8w"; ``--palettize N``:
``model_pal<N>.mlpackage``, "coreml/pal<N>") to the bundle, records the calibration set hash and
size, method, nodes kept in float with their SQNR, gate results and INT8 op counts in the
manifest, and writes ``DIR/calibration/<backend>.json/.md/.png`` (the PNG shows held-out photos,
fp32 and INT8 reconstructions).

Per graph: build the calibration and held-out sets (calibration/data.py), quantize everything
quantizable, check the gate on held-out data; while it fails, keep the most damaging nodes in
float (calibration/sensitivity.py) for at most --max-rounds rounds; if that fails, score each node alone in float
at the graph's output and run the rounds again in that order (--measure-minutes). Then the end-to-end gate.
Any failure exits non-zero (1: a gate, 2: bad input) and leaves the bundle byte-identical.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from dcae_edge.cli import at_least, fraction, short_warnings
from export.bundle import BundleError, bundle_transaction, package_versions, read_manifest, record_artifact, write_manifest
from export.common import LEAN_ABOVE_MB, summarize

from runtimes.precision import AUTO_TIE, cpu_key

from . import CalibrationError, GateFailed
from .data import GRAPH_ORDER, FeedSet, SetOptions, batched, build_sets, graph_sizes
from .quality import Gates, describe_e2e, describe_gate, e2e_gate, graph_gate, run_set, worst_feed_sqnr
from .sensitivity import Outcome, failure_message, keep_float_until_gate, measure_set, rank_feeds

BACKENDS = {"onnxruntime": "OnnxRuntimeBackend", "openvino": "OpenVinoBackend", "coreml": "CoreMLBackend"}


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m calibration", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--backend", required=True, choices=list(BACKENDS))
    ap.add_argument("--graphs", nargs="+", choices=GRAPH_ORDER, default=None,
                    help="default: every graph of the bundle that has the backend's fp32 artifact")
    ap.add_argument("--data", type=Path, default=None,
                    help="calibration photo folder (default data/photos/calibration) or .npz of <graph>.<input> arrays")
    ap.add_argument("--eval-data", type=Path, default=None,
                    help="held-out photo folder (default data/photos/eval, else the packaged sample photos)")
    ap.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                    help="activation range estimation (entropy/percentile: ~10x slower)")
    ap.add_argument("--max-drop", type=float, default=None,
                    help="OpenVINO: use nncf.quantize_with_accuracy_control; decoder budget in dB of reconstruction "
                         "PSNR vs the photos (encoder/transformer: 1 - their min cosine)")
    ap.add_argument("--smooth-quant", action="store_true",
                    help="OpenVINO: keep NNCF's SmoothQuant for the transformer (off by default: it cost accuracy here)")
    ap.add_argument("--palettize", type=int, choices=[4, 6, 8], default=None,
                    help="Core ML: k-means palettized weights (N bits) instead of int8 per-channel weights")
    ap.add_argument("--num-samples", type=at_least(1), default=32, help="calibration feeds per graph")
    ap.add_argument("--num-eval", type=at_least(1), default=8, help="held-out photos (transformer: feeds, whole trajectories)")
    ap.add_argument("--steps", type=at_least(1), default=10, help="sampling steps of each recorded trajectory")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance of the recorded trajectories (default: the "
                    "bundle recipe's, i.e. how the model samples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="calibration set cache (default ~/.cache/dcae-edge/calibration)")
    g = ap.add_argument_group("gates")
    g.add_argument("--decoder-min-psnr", type=float, default=32.0, help="INT8 vs fp32 decoded images, dB")
    g.add_argument("--encoder-min-cosine", type=float, default=0.99)
    g.add_argument("--transformer-min-cosine", type=float, default=0.99)
    g.add_argument("--max-e2e-drop", type=float, default=0.3, help="reconstruction PSNR drop vs the photos, dB")
    g.add_argument("--max-rounds", type=at_least(0), default=6, help="sensitivity rounds (each adds twice as many nodes to those in float as the last: 1, 3, 7, ...)")
    ap.add_argument("--skip-failed-graphs", action="store_true",
                    help="write the graphs that pass their gates and leave out (with a message) those that do not, "
                         "instead of writing nothing; the end-to-end gate still holds")
    ap.add_argument("--no-latency-aware", dest="latency_aware", action="store_false",
                    help="OpenVINO: quantize every op that passes the gate, even where INT8 is slower on this CPU")
    g.add_argument("--max-excluded", type=fraction, default=0.5,
                   help="at most this fraction of the quantized nodes may be kept in float")
    g.add_argument("--measure-minutes", type=float, default=30,
                   help="when the SQNR-ranked rounds miss a gate, score every node alone in float at the graph's output "
                        "and run the rounds again in that order, if that is estimated to take at most this long (0: never); "
                        "trim rounds (fewest nodes in float that pass) run where three quantizations fit it")
    args = ap.parse_args(argv)
    if args.measure_minutes < 0:
        ap.error(f"--measure-minutes {args.measure_minutes}: give 0 (never) or a positive budget in minutes")
    for flag, value, backend in (("--max-drop", args.max_drop is not None, "openvino"), ("--smooth-quant", args.smooth_quant, "openvino"),
                                 ("--palettize", args.palettize is not None, "coreml")):
        if value and args.backend != backend:
            ap.error(f"{flag} only applies to --backend {backend}")
    return args


def make_backend(args, manifest: dict, work: Path):
    module = importlib.import_module(f"calibration.{args.backend}")
    return getattr(module, BACKENDS[args.backend])(args.bundle, manifest, args, work)


def select_graphs(args, manifest: dict, backend) -> list[str]:
    if args.graphs:
        for g in args.graphs:
            if g not in manifest["graphs"]:
                raise CalibrationError(f"--graphs {g}: the bundle {args.bundle} has no {g} graph")
            backend.source_files(g)  # a clear error naming the export command when it is missing
        return [g for g in GRAPH_ORDER if g in args.graphs]
    graphs = [g for g in GRAPH_ORDER if g in manifest["graphs"] and backend.source_key(g)]
    if not graphs:
        backend.source_files(next(iter(manifest["graphs"]), "vae_decoder"))
    return graphs


class Fp32:
    """The backend's fp32 graphs, each loaded once (reference outputs and derived sets use them)."""

    def __init__(self, backend):
        self.backend, self.runners = backend, {}

    def __call__(self, graph: str):
        if graph not in self.runners:
            self.runners[graph] = self.backend.fp32_runner(graph)
        return self.runners[graph]

    def release(self, graph: str) -> None:
        """Forget a graph's runner until it is asked for again (a paper-size decoder's compiled fp32 graph
        would otherwise sit in memory through every quantization of it)."""
        self.runners.pop(graph, None)


def calibrate_graph(backend, graph: str, calib: FeedSet, held: FeedSet, gates: Gates, fp32: Fp32, args) -> Outcome:
    print(f"\n  [{graph}] {backend.name} INT8 from {len(calib.feeds)} calibration feeds ({calib.source}"
          + (", cached" if calib.cached else "") + f"); gate on {len(held.feeds)} held-out feeds", flush=True)
    reference = run_set(fp32(graph), held)
    fp32.release(graph)
    t = time.perf_counter()
    backend.prepare(graph, calib)
    evaluate = lambda attempt: graph_gate(graph, gates, reference, attempt.run, held)  # noqa: E731
    describe = partial(describe_gate, graph)
    measured = measure_set(calib)
    measured_reference = []  # fp32 outputs on the measure set, computed only if the measured rounds run

    def measure(attempt) -> float:
        if not measured_reference:
            measured_reference.append(run_set(fp32(graph), measured))
            fp32.release(graph)
        return worst_feed_sqnr(graph, measured_reference[0], attempt.run, measured)

    if args.max_drop is not None and hasattr(backend, "accuracy_control"):
        outcome = backend.accuracy_control(graph, calib, held, reference, gates, evaluate)
        print(f"    accuracy control: {describe(outcome.gate)}", flush=True)
    else:
        outcome = keep_float_until_gate(lambda ex: backend.quantize(graph, ex), evaluate,
                                        lambda attempt: backend.rank(graph, attempt, rank_feeds(calib, held)), describe,
                                        args.max_rounds, args.max_excluded, measure,
                                        args.measure_minutes * 60)
    if outcome.gate["pass"] and args.latency_aware:
        timed = hasattr(backend, "float_attempt")
        base = float_baseline(backend, graph) if timed else None
        if hasattr(backend, "latency_exclusions"):
            outcome = latency_refine(backend, graph, outcome, evaluate, describe, base)
        if timed:
            outcome.attempt.extra["versus_float"] = versus_float(backend, graph, outcome.attempt, base)
    if outcome.gate["pass"] and hasattr(backend, "bf16_run"):
        outcome.attempt.extra["validation_bf16"] = bf16_remainder_check(backend, graph, outcome.attempt, gates, reference,
                                                                        held, describe)
    outcome.attempt.release()  # compiled again for the end-to-end gate: not held while the next graph is quantized
    outcome.seconds = round(time.perf_counter() - t, 1)
    mark = "✓" if outcome.gate["pass"] else "✗"
    print(f"    -[{mark}] {describe(outcome.gate)}; {backend.describe_counts(outcome.attempt.counts)}"
          + (f"; kept in float: {', '.join(c.node for c in outcome.excluded)}" if outcome.excluded else ""), flush=True)
    return outcome


def bf16_remainder_check(backend, graph: str, attempt, gates: Gates, reference, held: FeedSet, describe) -> dict:
    """The INT8 graph once more with its float remainder in bf16 (OpenVINO's bf16 inference hint; what
    precision "int8-bf16" loads): the same gate, recorded apart, so auto may pick it only if it passed."""
    run, executed = backend.bf16_run(graph, attempt)
    if executed != "bf16":
        print(f"    bf16 remainder: not measured, this CPU executes the bf16 hint as {executed}", flush=True)
        return {"skipped": f"this CPU executes the bf16 hint as {executed}"}
    gate = graph_gate(graph, gates, reference, run, held)
    print(f"    -[{'✓' if gate['pass'] else '✗'}] with the float remainder in bf16: {describe(gate)}", flush=True)
    return {"pass": bool(gate["pass"]), "gate": describe(gate)}


def latency_refine(backend, graph: str, outcome: Outcome, evaluate, describe, base=None) -> Outcome:
    """Keep in float every quantized op that INT8 does not make faster on this CPU (per-layer
    timings of both graphs); accept the result only if it still passes the gate and is faster end to
    end (per-op timings miss the layout reorders a mix adds between INT8 and float neighbours).
    ``base``, the float graph, is timed in the same interleaved rounds, for versus_float."""
    slow, rows = backend.latency_exclusions(graph, outcome.attempt)
    outcome.attempt.extra["layer_latency"] = rows
    if not slow:
        print(f"    latency: INT8 is faster on all {len(rows)} timed quantized ops on this CPU", flush=True)
        return outcome
    if len(slow) >= len(rows):
        # nothing would be left in INT8 (seen on a Xeon whose bf16 float path beat every INT8 op of a
        # tiny encoder): keep the accuracy-chosen graph, which is still a quarter of the weight bytes
        print(f"    latency: no quantized op is faster in INT8 on this CPU ({len(rows)} timed); keeping the "
              "accuracy-chosen INT8 graph for its size, prefer float here for speed", flush=True)
        outcome.attempt.extra["int8_faster_nowhere"] = True
        outcome.attempt.extra["layer_latency"] = [{**r, "int8": True} for r in rows]  # they run in INT8 in the saved graph
        return outcome
    names = sorted(set(outcome.attempt.excluded) | set(slow))
    outcome.attempt.release()  # not held compiled while the mix is quantized (compiled again if it is kept)
    try:
        attempt = backend.quantize(graph, names)
    except CalibrationError as e:
        print(f"    latency: that mix could not be built ({e}); keeping the accuracy-chosen INT8 graph", flush=True)
        return outcome
    gate = evaluate(attempt)
    print(f"    latency: {len(slow)} of {len(rows)} quantized ops are no faster in INT8 on this CPU -> kept in float; "
          f"{describe(gate)}", flush=True)
    if not gate["pass"]:
        print("    latency: that mix misses the gate; keeping the accuracy-chosen INT8 graph", flush=True)
        return outcome
    mix_ms, plain_ms, *float_ms = backend.graph_ms(graph, [attempt, outcome.attempt] + ([base] if base else []))
    check = {"mix_ms": mix_ms, "accuracy_chosen_ms": plain_ms, "hint": backend.default_hint(),
             **({"float_ms": float_ms[0]} if float_ms else {})}
    # a tie within timing noise goes to the more accurate graph (on a shared machine, timing alone flipped the
    # digit transformer between a cosine-0.998 mix and the 0.9925 all-INT8 graph from one run to the next)
    tie = plain_ms <= mix_ms < plain_ms * (1 + AUTO_TIE) and gate["value"] > outcome.gate.get("value", float("inf"))
    if mix_ms >= plain_ms and not tie:
        print(f"    latency: the mix is no faster end to end ({mix_ms:.2f} vs {plain_ms:.2f} ms at {check['hint']}); "
              "keeping the accuracy-chosen INT8 graph", flush=True)
        outcome.attempt.extra["latency_check"] = {**check, "chosen_ms": plain_ms}
        outcome.attempt.extra["layer_latency"] = [{**r, "int8": True} for r in rows]  # the saved graph runs them in INT8
        return outcome
    if tie:
        check["tie"] = f"level within {AUTO_TIE:.0%}; the mix is more accurate ({gate['value']:.5g} vs {outcome.gate['value']:.5g} {gate.get('metric', '')})"
    print(f"    latency: end to end at {check['hint']}: the mix {mix_ms:.2f} ms vs {plain_ms:.2f} ms for the accuracy-chosen INT8 graph"
          + (f" ({check['tie']}: kept)" if tie else ""), flush=True)
    attempt.extra["latency_check"] = {**check, "chosen_ms": mix_ms}
    attempt.extra["layer_latency"] = rows
    attempt.extra["kept_float_for_speed"] = slow
    return Outcome(attempt, gate, outcome.excluded, outcome.ranking,
                   outcome.rounds + [{"round": "latency", "excluded": len(names), "gate": gate, "seconds": 0}],
                   mode=outcome.mode + " + latency-aware")


def float_baseline(backend, graph: str):
    """The float graph the INT8 one is timed against, or None where its weights are too large to compile both
    at once (they would be held twice more: 3.3 GB at paper size)."""
    return None if backend.source_bytes(graph) > LEAN_ABOVE_MB * 1e6 else backend.float_attempt(graph)


def versus_float(backend, graph: str, attempt, base) -> dict:
    """The INT8 graph being written against the float graph it came from (``base``), whole, on this CPU
    (interleaved medians at the backend's default float precision: bf16 where the CPU has it), read from the
    latency pass's rounds where it timed both. A slower INT8 graph is still written, since it may win on other
    CPUs, and auto measures there; the report says so."""
    if base is None:
        size = backend.source_bytes(graph)
        print(f"    INT8 vs float end to end: not timed ({size / 1e9:.1f} GB of weights; scripts/bench_int8.py times them apart)", flush=True)
        return {"skipped": f"{size / 1e9:.1f} GB of weights: timed by scripts/bench_int8.py instead"}
    check = attempt.extra.get("latency_check") or {}
    if "float_ms" in check:  # this attempt was timed with the float graph in the latency pass's rounds
        int8_ms, float_ms = check["chosen_ms"], check["float_ms"]
    else:
        int8_ms, float_ms = backend.graph_ms(graph, [attempt, base])
    base.release()
    hint, speedup = backend.default_hint(), float_ms / int8_ms
    verdict = (f"{speedup:.2f}x faster" if int8_ms < float_ms else
               "INT8 no faster here; auto times both on each CPU and picks; written for CPUs where INT8 wins")
    print(f"    INT8 vs {hint} end to end on this CPU: {int8_ms:.2f} vs {float_ms:.2f} ms, {verdict}", flush=True)
    return {"int8_ms": round(int8_ms, 3), "float_ms": round(float_ms, 3), "float": hint, "speedup": round(speedup, 3),
            "verdict": verdict, "cpu": cpu_key()}


def end_to_end(backend, results: dict[str, Outcome], held: dict[str, FeedSet], gates: Gates, fp32: Fp32, manifest):
    """Encoder + decoder, each INT8 where calibrated in this run, else fp32; None without both graphs."""
    if not ({"vae_encoder", "vae_decoder"} & set(results)):
        return None, None
    missing = [g for g in ("vae_encoder", "vae_decoder") if not backend.source_key(g)]
    if missing:
        print(f"\n  end-to-end gate skipped: the bundle has no fp32 {' / '.join(missing)} to reconstruct photos with", flush=True)
        return None, None
    photo_set = held.get("vae_encoder") or held["vae_decoder"]
    photos = FeedSet("vae_encoder", "evaluation", batched("sample", photo_set.photos, graph_sizes(manifest, "vae_encoder")["batch"]),
                     photo_set.source, photo_set.photos)
    int8 = tuple(results[g].attempt.run if g in results else fp32(g) for g in ("vae_encoder", "vae_decoder"))
    gate, images = e2e_gate(gates, photos, (fp32("vae_encoder"), fp32("vae_decoder")), int8,
                            graph_sizes(manifest, "vae_decoder")["batch"])
    gate["int8_graphs"] = [g for g in ("vae_encoder", "vae_decoder") if g in results]
    print(f"\n  -[{'✓' if gate['pass'] else '✗'}] {describe_e2e(gate)}", flush=True)
    return gate, images


def artifact_info(backend, graph: str, outcome: Outcome, calib: FeedSet, held: FeedSet) -> dict:
    return {"precision": "int8", "base": backend.source_key(graph), "backend": backend.name,
            "settings": backend.settings(), "calibration_set": calib.to_manifest(), "held_out_set": held.to_manifest(),
            "excluded_nodes": [c.to_dict() for c in outcome.excluded], "gate": outcome.gate,
            "rounds": len(outcome.rounds) - 1, "counts": outcome.attempt.counts, "seconds": outcome.seconds,
            "validation": {"pass": outcome.gate["pass"], "gate": describe_gate(graph, outcome.gate)},  # as exporters record it
            **outcome.attempt.extra}


def commit(args, backend, results: dict[str, Outcome], calib, held, e2e, images, gates: Gates, skipped: dict) -> Path:
    from .report import write_reports

    with bundle_transaction(args.bundle) as stage:
        manifest = read_manifest(stage)
        for graph, outcome in results.items():
            files = backend.save(graph, outcome.attempt, stage / graph)
            record_artifact(manifest, stage, graph, backend.key, files,
                            artifact_info(backend, graph, outcome, calib[graph], held[graph]))
        summary = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "artifact": backend.key,
                   "graphs": list(results), "gates": {**{g: o.gate for g, o in results.items()}, "end_to_end": e2e},
                   "thresholds": vars(gates), "settings": backend.settings(), "cpu": cpu_key(),
                   **({"graphs_left_out": skipped} if skipped else {}),
                   "versions": package_versions("onnxruntime", "openvino", "nncf", "coremltools", "numpy")}
        summary["report"] = write_reports(stage, backend, results, calib, held, summary, images)
        manifest.setdefault("calibration", {})[backend.name] = summary
        write_manifest(manifest, stage)
    return args.bundle / "calibration" / f"{backend.name}.md"


def main(argv=None):
    args = parse(argv)
    t0 = time.perf_counter()
    manifest = read_manifest(args.bundle) if Path(args.bundle).is_dir() else None
    if manifest is None:
        raise CalibrationError(f"--bundle {args.bundle} is not a dcae-edge bundle (no manifest.json); export one first "
                               "with python -m export.onnx / export.openvino / export.coreml")
    gates = Gates(args.encoder_min_cosine, args.decoder_min_psnr, args.transformer_min_cosine, args.max_e2e_drop)
    if args.cfg_scale is None:
        args.cfg_scale = float((manifest.get("sampler") or {}).get("cfg_scale") or 3.0)
    opts = SetOptions(args.data, args.eval_data, args.num_samples, args.num_eval, args.steps, args.cfg_scale, args.seed,
                      args.cache_dir)
    print(f"[calibration] {args.backend} INT8 for bundle {args.bundle} ({manifest.get('variant')}, "
          f"{manifest['resolution']}px, {'dynamic' if manifest.get('dynamic') else 'static'})", flush=True)
    with tempfile.TemporaryDirectory(prefix="dcae-calibration-") as work:
        backend = make_backend(args, manifest, Path(work))
        graphs = select_graphs(args, manifest, backend)
        fp32 = Fp32(backend)
        calib, held = build_sets(manifest, graphs, opts, fp32, backend.model_id)
        results = {g: calibrate_graph(backend, g, calib[g], held[g], gates, fp32, args) for g in graphs}
        failed = {g: failure_message(g, o, partial(describe_gate, g), args.max_rounds, args.max_excluded)
                  for g, o in results.items() if not o.gate["pass"]}
        skipped = {}
        if failed and args.skip_failed_graphs and len(failed) < len(results):
            skipped, failed = {g: why.split(". Kept in float")[0] for g, why in failed.items()}, {}
            results = {g: o for g, o in results.items() if g not in skipped}
            for g, why in skipped.items():
                print(f"\n  --skip-failed-graphs: {g} gets no {backend.key} artifact ({why})", flush=True)
        e2e, images = end_to_end(backend, results, held, gates, fp32, manifest) if not failed else (None, None)
        if e2e is not None and not e2e["pass"]:
            failed["end_to_end"] = f"{describe_e2e(e2e)} (--max-e2e-drop)"
        if failed:
            raise GateFailed("\n  ".join(failed.values()))
        report = commit(args, backend, results, calib, held, e2e, images, gates, skipped)
    summarize(read_manifest(args.bundle), args.bundle)
    print(f"INT8 artifacts written in {time.perf_counter() - t0:.0f} s; report {report}")


def run_cli(argv=None) -> int:
    """Exit codes: 0 ok, 1 a gate failed, 2 bad input; the bundle is untouched unless 0."""
    short_warnings()
    try:
        main(argv)
        return 0
    except (CalibrationError, BundleError) as e:
        print(f"\nerror: {e}\nthe bundle was not modified.", file=sys.stderr)
        return 1 if isinstance(e, GateFailed) else 2
    except KeyboardInterrupt:
        print("\ninterrupted: the bundle was not modified.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(run_cli())
