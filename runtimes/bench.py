"""Benchmarks of an exported bundle on this machine, next to the SD-VAE f8 baseline.

    python -m runtimes.bench --bundle exports/f64 --out docs/bench-f64 [--runs 10] [--rounds 3] [--threads 2] [--no-baseline]

For every graph x backend x precision in the bundle (ORT fp32/fp16/int8, OpenVINO f32/bf16/int8)
at batch 1 and 2: warm-up, N timed runs, p50/p90 latency, throughput and peak RSS (each
configuration runs in its own process so the RSS is its own), in --rounds rounds that take turns
(medians of the rounds: on a shared machine one slow spell no longer decides auto's mark). The baseline is diffusers'
AutoencoderKL (SD-VAE f8, random weights suffice for timing) and the same DiT as the bundle's
denoiser on SD-VAE latents with patch 2 (64x64x4 -> 1024 tokens at 512px), exported to ONNX and
OpenVINO the same way; end-to-end 512px generation time (steps x denoiser at CFG batch 2 + one
decode) is reported for both pipelines. Writes JSON, Markdown and a chart PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dcae_edge.cli import at_least, short_warnings
from dcae_edge.timing import time_calls

from .precision import cpu_isa, cpu_model, mark_auto, openvino_hint, openvino_precisions


def machine() -> dict:
    return {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def make_runner(kind: str, path: str, precision: str, threads: int):
    """The session an app gets for one artifact (onnxruntime, or OpenVINO at ``precision``'s hint)."""
    from .backends import OpenVinoGraph, OrtGraph

    if kind == "onnxruntime":
        return OrtGraph(Path(path), "cpu", threads)
    return OpenVinoGraph(Path(path), "CPU", openvino_hint(precision), threads)


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux keeps ``ru_maxrss`` across fork + exec, so a child started
    by a parent holding torch (~270 MB) would report the parent's peak; VmHWM starts fresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_one(args) -> dict:
    """Child process: build the runner, warm up, time. Returns latencies, the RSS before loading
    (interpreter + runtime) and the peak."""
    kind, path, precision, feeds_file, runs, warmup, threads = args
    feeds = dict(np.load(feeds_file))
    if kind == "onnxruntime":
        import onnxruntime  # noqa: F401 - counted in the base RSS, not the model's
    else:
        import openvino  # noqa: F401
    base_mb = peak_rss_mb()
    t = time.perf_counter()
    runner = make_runner(kind, path, precision, threads)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.run(feeds)
    first_ms = (time.perf_counter() - t) * 1000
    times = time_calls(lambda: runner.run(feeds), runs, max(0, warmup - 1))
    return {"load_s": round(load_s, 2), "first_ms": round(first_ms, 1), "p50_ms": round(statistics.median(times), 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2), "runs": runs, "base_rss_mb": round(base_mb, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def time_config(kind, path, precision, feeds, runs, warmup, threads) -> dict:
    """One configuration in a fresh interpreter that imports numpy and the runtime only (a
    multiprocessing worker would import this module's parent, torch included, and its import
    peak — the same ~270 MB for every row — would hide the model's memory)."""
    import subprocess
    import sys

    with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
        np.savez(f, **feeds)
    try:
        code = ("import json, sys; from runtimes.bench import _time_one; "
                "print(json.dumps(_time_one(json.loads(sys.argv[1]))))")
        r = subprocess.run([sys.executable, "-c", code, json.dumps([kind, path, precision, f.name, runs, warmup, threads])],
                           capture_output=True, text=True)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["model_rss_mb"] = round(out["peak_rss_mb"] - out["base_rss_mb"], 1)
        return out
    finally:
        os.unlink(f.name)


def merge_rounds(results: list[dict]) -> dict:
    """One row from a configuration's rounds (a fresh process each): the median of each timing and memory
    figure, the runs added up. Rounds interleave the configurations, so a slow spell of a shared machine
    lands on all of them instead of deciding which looks fastest. A round that failed makes the row fail."""
    failed = next((r for r in results if "p50_ms" not in r), None)
    if failed is not None:
        return failed
    row = {k: round(statistics.median(r[k] for r in results), 2) for k, v in results[0].items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    row["model_rss_mb"] = round(row["peak_rss_mb"] - row["base_rss_mb"], 1)  # as time_config: peak - base
    row["runs"] = sum(r["runs"] for r in results)
    row["rounds"] = len(results)
    return row


def feeds_for(graph: str, manifest: dict, batch: int) -> dict:
    from dcae_edge.schedules import initial_noise

    res, f = manifest["resolution"], manifest["autoencoder"]["spatial_compression"]
    if graph == "vae_encoder":
        from dcae_edge.data import sample_photos

        return {"sample": sample_photos(res, batch).numpy()}
    if graph == "vae_decoder":
        c = manifest["autoencoder"]["config"]["latent_channels"]
        return {"latent_sample": initial_noise((batch, c, res // f, res // f), 0) * 3}
    cfg = manifest["denoiser"]["config"]
    return {"hidden_states": initial_noise((batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"]), 0),
            "timestep": np.full(batch, 500.0, np.float32), "class_labels": np.zeros(batch, np.int64)}


def bundle_configs(bundle: Path, manifest: dict) -> list[tuple]:
    out = []
    for graph, info in manifest["graphs"].items():
        for key, art in info["artifacts"].items():
            fmt, prec = key.split("@")[0].split("/")
            if fmt == "onnx":
                out.append((graph, "onnxruntime", prec, bundle / art["files"][0]))
            elif fmt == "openvino":
                for p in openvino_precisions(prec):
                    out.append((graph, "openvino", p, bundle / art["files"][0]))
    return out


def baseline_models(manifest: dict, cache: Path) -> dict:
    """SD-VAE f8 encoder/decoder and the bundle's DiT on f8p2 latents, exported once (random weights)."""
    import torch

    cache.mkdir(parents=True, exist_ok=True)
    res = manifest["resolution"]
    paths = {"sd-vae decoder": cache / "sdvae_decoder.onnx", "sd-vae encoder": cache / "sdvae_encoder.onnx",
             "dit f8p2": cache / "dit_f8p2.onnx"}
    if all(p.is_file() for p in paths.values()):
        return paths
    from diffusers import AutoencoderKL

    from dcae_edge.denoiser import Denoiser, DenoiserConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4).eval()

    class Dec(torch.nn.Module):
        def forward(self, z):
            return vae.decode(z).sample

    class Enc(torch.nn.Module):
        def forward(self, x):
            return vae.encode(x).latent_dist.mean

    cfg = dict(manifest["denoiser"]["config"]) if manifest.get("denoiser") else {"arch": "dit", "hidden_size": 192, "depth": 6,
                                                                                  "num_heads": 4, "num_classes": 4}
    cfg.update(input_size=res // 8, in_channels=4, patch_size=2)
    dit = Denoiser(DenoiserConfig.from_dict(cfg)).eval()

    class Net(torch.nn.Module):
        def forward(self, h, t, y):
            return dit.net(h, t, y if dit.config.conditional else None)

    with torch.no_grad():
        for name, mod, args in (("sd-vae decoder", Dec(), (torch.randn(1, 4, res // 8, res // 8),)),
                                ("sd-vae encoder", Enc(), (torch.rand(1, 3, res, res) * 2 - 1,)),
                                ("dit f8p2", Net(), (torch.randn(2, 4, res // 8, res // 8), torch.full((2,), 500.0),
                                                     torch.zeros(2, dtype=torch.long)))):
            torch.onnx.export(mod, args, str(paths[name]), dynamo=True, opset_version=18, external_data=False)
    return paths


def baseline_feeds(name: str, res: int, batch: int, path: Path) -> dict:
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    rng = np.random.default_rng(0)
    if name == "sd-vae decoder":
        vals = [rng.standard_normal((batch, 4, res // 8, res // 8)).astype(np.float32)]
    elif name == "sd-vae encoder":
        vals = [rng.uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)]
    else:
        vals = [rng.standard_normal((batch, 4, res // 8, res // 8)).astype(np.float32),
                np.full(batch, 500.0, np.float32), np.zeros(batch, np.int64)]
    return dict(zip(names, vals))


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "p50_ms" in r and r["batch"] == (2 if r["graph"] in ("transformer", "dit f8p2") else 1)]
    labels = [f"{r['graph']}\n{r['backend']} {r['precision']}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(ok)), 4.5))
    colors = ["tab:orange" if r.get("baseline") else "tab:blue" for r in ok]
    ax.bar(range(len(ok)), [r["p50_ms"] for r in ok], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency (ms, log)")
    ax.set_xticks(range(len(ok)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_title(title + "  (blue: DC-AE bundle, orange: SD-VAE f8 baseline)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--out", default=None)
    ap.add_argument("--runs", type=at_least(1), default=10, help="timed runs per configuration and round")
    ap.add_argument("--rounds", type=at_least(1), default=3,
                    help="the bundle's configurations take turns this many times (a fresh process each); medians reported")
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--steps", type=at_least(1), default=30, help="denoising steps for the end-to-end estimate")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--cache", default=".cache/bench", type=Path)
    args = ap.parse_args(argv)
    short_warnings()
    from .backends import openvino_runs_bf16
    from .pipeline import BundleError, read_manifest

    try:
        manifest = read_manifest(args.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = []
    artifacts = bundle_configs(args.bundle, manifest)
    skip_bf16 = any(b == "openvino" for _, b, _, _ in artifacts) and not openvino_runs_bf16()
    if skip_bf16:
        print(f"no native bf16 on this CPU ({cpu_isa()}): OpenVINO's bf16 and int8-bf16 would run f32; not timed", flush=True)
    for graph, backend, prec, path in artifacts:
        if skip_bf16 and backend == "openvino" and openvino_hint(prec) == "bf16":
            continue
        for batch in (1, 2) if graph != "transformer" else (2, 4):
            static = not manifest.get("dynamic", True)
            if static and batch != (2 if graph == "transformer" else 1):
                continue
            configs.append(({"graph": graph, "backend": backend, "precision": prec, "batch": batch},
                            (backend, str(path), prec, feeds_for(graph, manifest, batch))))
    results: list[list[dict]] = [[] for _ in configs]
    for rnd in range(args.rounds):
        for (label, (backend, path, prec, feeds)), done in zip(configs, results):
            done.append(time_config(backend, path, prec, feeds, args.runs, args.warmup, args.threads))
            print(json.dumps({**label, "round": rnd + 1, **done[-1]}), flush=True)
    rows = []
    for (label, _), done in zip(configs, results):
        r = {**label, **merge_rounds(done)}
        if "p50_ms" in r:
            r["items_per_s"] = round(r["batch"] * 1000 / r["p50_ms"], 2)
        rows.append(r)
    if not args.no_baseline:
        for name, path in baseline_models(manifest, args.cache).items():
            batch = 2 if name == "dit f8p2" else 1
            runs = max(2, args.runs // 3) if "vae" in name else args.runs
            for backend, prec in (("onnxruntime", "fp32"), ("openvino", "fp32")) + ((("openvino", "bf16"),) if not skip_bf16 else ()):
                r = {"graph": name, "backend": backend, "precision": prec, "batch": batch, "baseline": True,
                     **time_config(backend, str(path), prec, baseline_feeds(name, manifest["resolution"], batch, path),
                                   runs, 1, args.threads)}
                rows.append(r)
                print(json.dumps(r), flush=True)

    print("precision auto on these timings (the fastest gated artifact, batch 1; the denoiser at its CFG batch 2):")
    mark_auto(rows, manifest, "p50_ms")
    e2e = end_to_end(rows, args.steps)
    report = {"bundle": str(args.bundle), "resolution": manifest["resolution"], "machine": machine(),
              "threads": args.threads, "bf16_not_timed": skip_bf16, "runs": args.runs, "rounds": args.rounds, "rows": rows, "end_to_end": e2e,
              "command": "python -m runtimes.bench " + " ".join(argv or __import__("sys").argv[1:])}
    out = Path(args.out or args.bundle / "bench")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(to_markdown(report))
    chart(rows, out.with_suffix(".png"), f"{args.bundle.name} @ {manifest['resolution']}px, {args.threads} threads")
    print(to_markdown(report))
    return 0


def end_to_end(rows: list[dict], steps: int) -> list[dict]:
    """steps x denoiser (CFG batch 2) + one decode, per backend/precision present for both parts."""
    def p50(graph, backend, prec, batch):
        for r in rows:
            if (r["graph"], r["backend"], r["precision"], r["batch"]) == (graph, backend, prec, batch) and "p50_ms" in r:
                return r["p50_ms"]
        return None

    out = []
    for backend, prec in sorted({(r["backend"], r["precision"]) for r in rows}):
        for name, den, dec in (("DC-AE", "transformer", "vae_decoder"), ("SD-VAE f8p2", "dit f8p2", "sd-vae decoder")):
            d, v = p50(den, backend, prec, 2), p50(dec, backend, prec, 1)
            if d is not None and v is not None:
                out.append({"pipeline": name, "backend": backend, "precision": prec, "steps": steps,
                            "denoiser_ms": d, "decode_ms": v, "total_s": round((steps * d + v) / 1000, 3)})
    return out


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Benchmark of `{report['bundle']}` at {report['resolution']}px on {m['cpu']} ({m.get('isa', 'ISA not recorded')}; {m['cores']} cores, "
             f"{report['threads']} threads pinned), {m['system']}. {report['runs']} timed runs after warm-up "
             f"in each of {report.get('rounds', 1)} rounds that take turns (medians of the rounds; the baselines one round); "
             "each configuration in its own process.", "", f"Command: `{report['command']}`", "",
             *(["This CPU has no native bf16: OpenVINO would run its bf16 precisions (bf16, int8-bf16) in f32, so they "
                "are not timed and auto chooses among the others.", ""] if report.get("bf16_not_timed") else []),
             "Peak RSS is each configuration's own process; the runtime alone (interpreter, numpy, the runtime "
             "library) is the base, so model + activations = peak - base. Load s = building the session. **auto** marks "
             "what `precision=\"auto\"` picks per graph and backend on this CPU (the fastest artifact that passed its "
             "gate, a tie within 5% going to the more accurate one, at batch 1; the denoiser at its CFG batch 2).", "",
             "| graph | backend | precision | batch | p50 ms | p90 ms | items/s | first run ms | load s | peak RSS MB | base MB | "
             "model MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = r["graph"] + (" (baseline)" if r.get("baseline") else "")
        prec = r["precision"] + (" **auto**" if r.get("auto") else "")
        if "error" in r:
            lines.append(f"| {name} | {r['backend']} | {prec} | {r['batch']} | error: {r['error']} | | | | | | | |")
        else:
            lines.append(f"| {name} | {r['backend']} | {prec} | {r['batch']} | {r['p50_ms']} | {r['p90_ms']} | "
                         f"{r.get('items_per_s', round(r['batch'] * 1000 / r['p50_ms'], 2))} | {r['first_ms']} | "
                         f"{r['load_s']} | {r['peak_rss_mb']} | {r.get('base_rss_mb', '')} | {r.get('model_rss_mb', '')} |")
    if report["end_to_end"]:
        lines += ["", f"End-to-end {report['resolution']}px generation (steps x denoiser at CFG batch 2 + one decode):", "",
                  "| pipeline | backend | precision | steps | denoiser step ms | decode ms | total s |", "|---|---|---|---|---|---|---|"]
        for e in report["end_to_end"]:
            lines.append(f"| {e['pipeline']} | {e['backend']} | {e['precision']} | {e['steps']} | {e['denoiser_ms']} | "
                         f"{e['decode_ms']} | {e['total_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
