"""CPU latency of a bundle's graphs: fp32, bf16 and INT8, per backend (a benchmark, not a test).

    python scripts/bench_int8.py --bundle exports/f64 --out docs/bench_int8_f64 --repeats 20 --rounds 5

Runs every graph that has the artifacts: onnxruntime fp32 (``onnx/fp32``) and INT8 (``onnx/int8``);
OpenVINO f32 and bf16 (``openvino/fp32`` compiled with INFERENCE_PRECISION_HINT f32 / bf16) and
INT8 (``openvino/int8``, its float remainder in f32 and in bf16). Core ML needs macOS to run and is
listed as skipped elsewhere. Protocol: 2 threads pinned to 2 cores (ORT intra-op threads, OV
INFERENCE_NUM_THREADS + CPU pinning + LATENCY hint), a cold first run reported apart (session
creation / compile included), --warmup runs, then the median (and p90) of --repeats timed runs (rounded up to
a multiple of --rounds) taken in --rounds interleaved rounds (all configurations of a graph loaded at once, taking turns), on
real inputs (packaged photos, their fp32 latents, a mid-trajectory denoiser batch). Each output is
compared with its backend's fp32 output (PSNR, cosine), and the calibration gates recorded in the
manifest are quoted. Writes OUT.json and OUT.md; the verdict says whether the INT8 decoder is at
least --target x faster than OpenVINO bf16 at <= the allowed loss, or that INT8 cannot beat bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcae_edge.cli import at_least, short_warnings  # noqa: E402
from dcae_edge.compare import compare  # noqa: E402
from dcae_edge.timing import time_calls, time_interleaved  # noqa: E402
from export.bundle import package_versions, read_manifest  # noqa: E402
from runtimes.backends import openvino_runs_bf16  # noqa: E402
from runtimes.precision import OPENVINO_PRECISIONS, cpu_isa, cpu_key, cpu_model, mark_auto, openvino_artifacts, openvino_hint  # noqa: E402

THREADS = 2
# measured on this kind of machine for the paper-size f64c128 decoder at 512px (docs / issue)
REFERENCE = {"vae_decoder@512 paper f64c128": {"openvino f32": 7900.0, "openvino bf16": 1460.0}}


def pin_threads(n: int) -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cpus)
    return cpus


def read_latents(path: Path, manifest: dict) -> np.ndarray:
    """--decoder-latents: the bundle decoder's feeds, checked as calibration checks its --data, else a one-line error."""
    from calibration import CalibrationError
    from calibration.data import check_feeds, file_sets

    try:
        decoder = file_sets(path, manifest, flag="--decoder-latents").get("vae_decoder")
        if decoder is None:
            raise CalibrationError(f"--decoder-latents {path} has no vae_decoder.latent_sample array")
        decoder.kind = "--decoder-latents"  # the messages say "<kind> set for vae_decoder (<path>): ..."
        check_feeds(decoder, manifest)
    except CalibrationError as e:
        raise SystemExit(f"error: {e}") from None
    return np.concatenate([f["latent_sample"] for f in decoder.feeds])


def example_inputs(manifest: dict, bundle: Path, decoder_latents: Path | None = None) -> dict[str, dict]:
    """Real inputs per graph at the bundle's export shapes. A decoder-only bundle decodes a latent of
    ``decoder_latents`` (an .npz as calibration's --data: ``vae_decoder.latent_sample``; one it held out; used wherever it
    is given), else the encoder's latent of a photo, else a standard normal one (which INT8 calibrated on real latents may
    clip: the PSNR column then says little)."""
    from calibration.data import graph_sizes
    from dcae_edge.data import sample_photos
    from export.onnx import ort_runner

    res = manifest["resolution"]
    feeds = {}
    graphs = manifest["graphs"]
    if "vae_encoder" in graphs or "vae_decoder" in graphs:
        photo = sample_photos(res, graph_sizes(manifest, "vae_encoder")["batch"]).numpy()
        feeds["vae_encoder"] = {"sample": photo}
        enc = graphs.get("vae_encoder", {}).get("artifacts", {}).get("onnx/fp32")
        if "vae_decoder" in graphs:
            if decoder_latents:  # asked for by name: used even where the bundle has an encoder
                given = read_latents(decoder_latents, manifest)
                latent = given[3::4] if len(given) >= 4 else given  # the ones calibration held out
            elif enc:
                latent = ort_runner(bundle / enc["files"][0])({"sample": photo})[0]
            else:
                f, c = manifest["autoencoder"]["spatial_compression"], manifest["autoencoder"]["config"]["latent_channels"]
                latent = np.random.default_rng(0).standard_normal((1, c, res // f, res // f)).astype(np.float32)
            feeds["vae_decoder"] = {"latent_sample": latent[: graph_sizes(manifest, "vae_decoder")["batch"]]}
    if "transformer" in graphs and manifest.get("denoiser"):
        cfg = manifest["denoiser"]["config"]
        b = graph_sizes(manifest, "transformer")["batch"]
        rng = np.random.default_rng(0)
        k = cfg["num_classes"]
        feeds["transformer"] = {
            "hidden_states": rng.standard_normal((b, cfg["in_channels"], cfg["input_size"], cfg["input_size"])).astype(np.float32),
            "timestep": np.full(b, 500.0, np.float32),
            "class_labels": np.array([i % max(k, 1) for i in range(b // 2)] + [k] * (b - b // 2), np.int64)}
    return {g: f for g, f in feeds.items() if g in graphs}  # a partial bundle: only the graphs it has


def timing_stats(times: list[float], cold: float) -> dict:
    times = sorted(times)
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "min_ms": round(times[0], 2), "cold_ms": round(cold, 1), "runs": len(times)}


def runner_factory(backend: str, path: Path, precision: str = "fp32"):
    """A factory for one configuration's ``run(feeds) -> first output``, made when its turn comes (so
    sessions are built inside the measured process): the session ``runtimes.bench`` and apps get, at THREADS threads."""
    from runtimes.bench import make_runner

    def make():
        graph = make_runner(backend, path, precision, THREADS)
        return lambda feeds: graph.run(feeds)[0]
    return make


# report labels of OpenVINO's runtime precisions (runtimes.precision.AUTO_NAMES reads them back)
OPENVINO_LABELS = {"fp32": "f32", "bf16": "bf16", "int8": "int8 (+f32)", "int8-bf16": "int8 (+bf16)"}


NO_BF16 = "this CPU has no native bf16: OpenVINO runs the bf16 hint as f32"


def openvino_configs(arts: dict) -> list[tuple[str, str | None, str]]:
    """(label, artifact key, runtime precision) for every OpenVINO precision (runtimes.precision's table: which
    IR it loads, at which INFERENCE_PRECISION_HINT) that this graph's artifacts allow; the bf16 ones get no key
    where the CPU has no bf16 (a skipped row, so the report says why they are missing)."""
    bf16 = openvino_runs_bf16()
    out = []
    for precision in OPENVINO_PRECISIONS:
        key = next((k for k in openvino_artifacts(precision) if k in arts), None)
        if key:
            out.append((OPENVINO_LABELS[precision], key if openvino_hint(precision) == "f32" or bf16 else None, precision))
    return out


def configs(manifest: dict, bundle: Path, graph: str) -> list[tuple[str, str, object]]:
    """(backend, precision, runner factory or why it cannot run here) for every artifact of ``graph``."""
    arts = manifest["graphs"][graph]["artifacts"]
    path = lambda key: bundle / arts[key]["files"][0]  # noqa: E731
    out = []
    if "onnx/fp32" in arts:
        out.append(("onnxruntime", "fp32", runner_factory("onnxruntime", path("onnx/fp32"))))
    if "onnx/int8" in arts:
        out.append(("onnxruntime", "int8", runner_factory("onnxruntime", path("onnx/int8"))))
    if any(k.startswith("openvino/") for k in arts):
        out += [("openvino", label, runner_factory("openvino", path(key), precision) if key else NO_BF16)
                for label, key, precision in openvino_configs(arts)]
    for key in (k for k in arts if k.startswith("coreml/")):
        out.append(("coreml", key.split("/")[1], "Core ML runs on macOS only"))
    return out


def runs_per_round(args) -> int:
    """--repeats spread over --rounds, rounded up: each configuration runs rounds x this many times."""
    return max(1, -(-args.repeats // args.rounds))


def bench_graph(manifest: dict, bundle: Path, graph: str, feeds: dict, args) -> list[dict]:
    """Every configuration of one graph is loaded (cold time apart) and warmed up first; then they take
    turns, --rounds rounds of repeats/rounds runs each, so that a noisy neighbour or a clock change on a
    shared machine hits all of them alike instead of whichever ran at the time."""
    rows, reference, loaded, skipped = [], {}, [], []
    for backend, precision, make in configs(manifest, bundle, graph):
        if isinstance(make, str):
            skipped.append({"graph": graph, "backend": backend, "precision": precision, "skipped": make})
            continue
        t = time.perf_counter()
        run = make()
        out = run(feeds)
        loaded.append((backend, precision, run, out, (time.perf_counter() - t) * 1000))
        time_calls(lambda: run(feeds), 0, args.warmup)
    per_round = runs_per_round(args)
    all_times = time_interleaved([lambda run=run: run(feeds) for _, _, run, _, _ in loaded], per_round, args.rounds)
    for (backend, precision, _, out, cold), times in zip(loaded, all_times):
        r = timing_stats(times, cold)
        reference.setdefault(backend, out)  # the first (fp32) configuration of each backend
        m = compare(reference[backend], out)
        rows.append({"graph": graph, "backend": backend, "precision": precision, **r,
                     "psnr_vs_fp32": round(m["psnr"], 2), "cosine_vs_fp32": round(m["cosine"], 6)})
        print(f"  {graph:12s} {backend:12s} {precision:13s} median {r['median_ms']:9.2f} ms  "
              f"(p90 {r['p90_ms']:.2f}, cold {r['cold_ms']:.0f})  PSNR vs fp32 {m['psnr']:.1f} dB", flush=True)
    return rows + skipped  # what could not run here after what did


# kinds of CPU-plugin nodes (performance-counter node types) for the breakdown; shortcut convolutions are layout
COMPUTE_OPS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
LAYOUT_OPS = ("Reorder", "Transpose", "DepthToSpace", "SpaceToDepth", "Broadcast", "VariadicSplit", "Split", "Concat",
              "Pad", "Gather", "StridedSlice", "Reshape", "Interpolate")
# INT8 dot-product instructions do twice the multiply-adds of their bf16 counterparts (AVX512-VNNI
# vpdpbusd vs AVX512-BF16 vdpbf16ps; AMX int8 vs bf16 tiles): the most INT8 can gain on the compute ops
INT8_COMPUTE_GAIN = 2.0


def op_kind(node_type: str) -> str:
    if node_type.startswith(COMPUTE_OPS):
        return "compute"
    if node_type.startswith(LAYOUT_OPS):
        return "layout"
    return "quantize" if node_type == "FakeQuantize" else "other"


def breakdown(manifest: dict, bundle: Path, graph: str, feeds: dict, runs: int = 20) -> list[dict]:
    """Where each OpenVINO configuration spends its time (performance counters, summed per kind of op),
    and the most INT8 could gain over bf16 on this graph: its compute twice as fast, the rest unchanged."""
    import openvino as ov

    from calibration.openvino import shortcut_convolutions
    from export.openvino import profile_nodes
    from runtimes.backends import openvino_config

    arts = manifest["graphs"][graph]["artifacts"]
    core, rows = ov.Core(), []
    for precision, key, runtime_precision in openvino_configs(arts):
        if key is None:  # a bf16 precision on a CPU without bf16
            continue
        hint = openvino_hint(runtime_precision)
        model = core.read_model(str(bundle / arts[key]["files"][0]))
        # export.graph_forms' shortcut convolutions copy or average channels: layout work, which INT8 never takes
        shortcuts = set(shortcut_convolutions(model))
        nodes = profile_nodes(core, model, feeds, hint, runs, openvino_config(hint, THREADS))
        kinds = {"compute": 0.0, "layout": 0.0, "quantize": 0.0, "other": 0.0}
        per_type: dict[str, float] = {}
        shortcut_ms = 0.0
        for (name, node_type, kernel), ms in nodes.items():
            is_shortcut = name in shortcuts
            kind = "layout" if is_shortcut else op_kind(node_type)
            kinds[kind] += ms
            shortcut_ms += ms if is_shortcut else 0.0
            if kind != "compute":
                label = f"{node_type}{' shortcut' * is_shortcut} ({kernel})"
                per_type[label] = per_type.get(label, 0.0) + ms
        row = {"graph": graph, "precision": precision, **{f"{k}_ms": round(v, 2) for k, v in kinds.items()},
               "total_ms": round(sum(kinds.values()), 2), "shortcut_ms": round(shortcut_ms, 2),
               "largest_other": [[k, round(v, 2)] for k, v in sorted(per_type.items(), key=lambda kv: -kv[1])[:4]]}
        if precision == "bf16":
            rest = row["total_ms"] - kinds["compute"]
            row["int8_ceiling_vs_bf16"] = round(row["total_ms"] / (kinds["compute"] / INT8_COMPUTE_GAIN + rest), 2)
        rows.append(row)
    return rows


def verdict(rows: list[dict], manifest: dict, target: float, max_loss: float, breakdowns: list[dict] = ()) -> list[str]:
    lines = []
    ms = {(r["backend"], r["precision"]): r for r in rows if r["graph"] == "vae_decoder" and "median_ms" in r}
    no_bf16 = any(r.get("skipped") == NO_BF16 for r in rows)
    # the float to beat: bf16, or where the CPU has none (AVX2) the fastest f32 the bundle runs
    floats = [ms.get(("openvino", "bf16"))] if not no_bf16 else [r for k, r in ms.items() if k[1] in ("f32", "fp32")]
    floats = [r for r in floats if r]
    int8 = [r for k, r in ms.items() if "int8" in k[1]]
    if not floats or not int8:
        return ["No verdict: the bundle lacks an OpenVINO float decoder or an INT8 decoder (run python -m calibration)."]
    bf16 = min(floats, key=lambda r: r["median_ms"])
    best = min(int8, key=lambda r: r["median_ms"])
    speedup = bf16["median_ms"] / best["median_ms"]
    if no_bf16:
        lines.append(f"This CPU has no native bf16, so the float to beat is the fastest f32 decoder ({bf16['backend']}); "
                     "the bf16 target below is read against it.")
    e2e = (manifest.get("calibration", {}).get(best["backend"], {}).get("gates", {}) or {}).get("end_to_end") or {}
    loss = e2e.get("value")
    loss_text = f"end-to-end reconstruction loss {loss:.3f} dB (calibration gate)" if loss is not None else "loss not recorded"
    ok_loss = loss is not None and loss <= max_loss
    lines.append(f"Fastest INT8 decoder: {best['backend']} {best['precision']} {best['median_ms']:.1f} ms vs {bf16['backend']} "
                 f"{bf16['precision']} {bf16['median_ms']:.1f} ms: {speedup:.2f}x (target >= {target}x at <= {max_loss} dB); {loss_text}.")
    graph_gate = (manifest.get("calibration", {}).get(best["backend"], {}).get("gates", {}) or {}).get("vae_decoder") or {}
    if speedup >= target and ok_loss:
        lines.append("Target met.")
    elif speedup >= target and loss is None:
        lines.append(f"Speed target met ({speedup:.2f}x >= {target}x); the reconstruction loss is unmeasured (no end-to-end gate: "
                     "a bundle without an encoder has no photos to reconstruct)"
                     + (f"; the INT8 decoder's own gate: {graph_gate['metric']} {graph_gate['value']:.2f}{' dB' * (graph_gate['metric'] == 'psnr')} "
                        f"vs its fp32 output (>= {graph_gate['threshold']})" if graph_gate.get("metric") else "") + ".")
    elif speedup < 1:
        lines.append(f"INT8 does not beat {bf16['precision']} in this run: that decoder is {1 / speedup:.2f}x faster than the best INT8 "
                     f"one (auto picks {bf16['precision']}).")
    else:
        lines.append(f"Target missed: INT8 is {speedup:.2f}x {bf16['precision']}" + ("" if ok_loss else " and/or the loss budget is not met") + ".")
    ceiling = next((b["int8_ceiling_vs_bf16"] for b in breakdowns if b["graph"] == "vae_decoder" and "int8_ceiling_vs_bf16" in b), None)
    if ceiling is not None:
        lines.append(f"Ceiling on this graph and CPU: {ceiling:.2f}x bf16, if INT8 ran every convolution and matmul twice as fast as "
                     "bf16 (the ISA's limit) and the rest (layout, normalisation, activations) as fast as bf16 does.")
    return lines


def store_timings(bundle: Path, timings: dict) -> None:
    """Keep these timings in the bundle for this CPU model and ISA: precision="auto" then needs no probe here."""
    from export.bundle import bundle_transaction, read_manifest, write_manifest

    with bundle_transaction(bundle) as stage:
        m = read_manifest(stage)
        m.setdefault("benchmarks", {})[cpu_key()] = timings
        write_manifest(m, stage)


def markdown(report: dict) -> str:
    lines = [f"# INT8 vs fp32 / bf16 latency: {report['bundle']}", "",
             f"{report['cpu']} ({report.get('isa', 'ISA not recorded')}); {THREADS} threads pinned to CPUs {report['cpus']}; warm-up {report['warmup']}, median of "
             f"{report.get('runs', report['repeats'])} runs taken in {report.get('rounds', 1)} interleaved rounds; resolution {report['resolution']}px; versions {report['versions']}", "",
             "**auto** marks what `precision=\"auto\"` picks on this CPU (the fastest artifact that passed its gate; a tie within 5% goes to the more accurate one).", "",
             "| graph | backend | precision | median ms | p90 ms | cold ms | speed-up vs fp32 | PSNR vs fp32 dB | cosine |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['graph']} | {r['backend']} | {r['precision']} | skipped: {r['skipped']} | | | | | |")
            continue
        base.setdefault((r["graph"], r["backend"]), r["median_ms"])
        mark = " **auto**" if r.get("auto") else ""
        lines.append(f"| {r['graph']} | {r['backend']} | {r['precision']}{mark} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['cold_ms']:.0f} | {base[(r['graph'], r['backend'])] / r['median_ms']:.2f}x | {r['psnr_vs_fp32']} | "
                     f"{r['cosine_vs_fp32']} |")
    lines += ["", "Reference (../shared/docs/machine-notes.md, a Sapphire-Rapids CPU with AMX): " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {v / 1000:.2f} s" for p, v in d.items()) for k, d in REFERENCE.items()), "",
        "## Verdict", ""] + [f"- {v}" for v in report["verdict"]]
    if report.get("breakdown"):
        lines += ["", "## Where OpenVINO spends the time", "",
                  f"Performance counters, ms per run summed per kind of op (compute: convolutions, matmuls; layout: reorders, "
                  f"transposes, depth/space moves, broadcasts, splits, the shortcut convolutions); ceiling: total / (compute / {INT8_COMPUTE_GAIN:g} + rest), "
                  "the most INT8 could gain over bf16 here.", "",
                  "| graph | precision | compute | layout | quantize | other | sum | INT8 ceiling vs bf16 | largest non-compute |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in report["breakdown"]:
            top = ", ".join(f"{k} {v:.1f}" for k, v in b["largest_other"])
            ceiling = f"{b['int8_ceiling_vs_bf16']:.2f}x" if "int8_ceiling_vs_bf16" in b else ""
            lines.append(f"| {b['graph']} | {b['precision']} | {b['compute_ms']:.1f} | {b['layout_ms']:.1f} | {b['quantize_ms']:.1f} | "
                         f"{b['other_ms']:.1f} | {b['total_ms']:.1f} | {ceiling} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--graphs", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/bench_int8"), help="writes OUT.json and OUT.md")
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--repeats", type=at_least(1), default=20, help="timed runs per configuration, in all")
    ap.add_argument("--rounds", type=at_least(1), default=5, help="the configurations of a graph take turns this many times")
    ap.add_argument("--target", type=float, default=1.5, help="wanted INT8 speed-up over OpenVINO bf16 (decoder)")
    ap.add_argument("--store", action="store_true", help="store the timings in the bundle for this CPU (precision=auto)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the OpenVINO performance-counter breakdown")
    ap.add_argument("--decoder-latents", type=Path, default=None,
                    help="bundles without an encoder: .npz with vae_decoder.latent_sample (real latents) to decode")
    ap.add_argument("--max-loss", type=float, default=0.3, help="allowed end-to-end PSNR loss, dB")
    args = ap.parse_args(argv)
    short_warnings()
    manifest = read_manifest(args.bundle)
    if manifest is None:
        raise SystemExit(f"error: {args.bundle} is not a dcae-edge bundle")
    cpus = pin_threads(THREADS)
    feeds = example_inputs(manifest, args.bundle, args.decoder_latents)
    missing = [g for g in (args.graphs or []) if g not in feeds]
    if missing:
        raise SystemExit(f"error: {args.bundle} has no {', '.join(missing)} graph (it holds {', '.join(manifest['graphs'])})")
    rows = []
    breakdowns = []
    for graph in args.graphs or [g for g in ("vae_encoder", "vae_decoder", "transformer") if g in feeds]:
        rows += bench_graph(manifest, args.bundle, graph, feeds[graph], args)
        if not args.no_breakdown:
            breakdowns += breakdown(manifest, args.bundle, graph, feeds[graph])
    timings = mark_auto(rows, manifest)
    if args.store:
        store_timings(args.bundle, timings)
    report = {"bundle": str(args.bundle), "variant": manifest.get("variant"), "resolution": manifest["resolution"],
              "cpu": cpu_model(), "isa": cpu_isa(), "cpus": cpus, "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds,
              "runs": runs_per_round(args) * args.rounds,
              "versions": package_versions("onnxruntime", "openvino", "nncf"), "rows": rows, "reference": REFERENCE,
              "verdict": verdict(rows, manifest, args.target, args.max_loss, breakdowns), "breakdown": breakdowns,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print("\n".join(report["verdict"]))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
