"""Paper-size released-generator benchmark (not a test): UViT-H on f64c128 latents (8x8x128,
64 tokens) and on f32c32 latents (16x16x32, 256 tokens), random weights written in the released
hub layout, exported through the same command a user runs on a downloaded folder.

    python scripts/bench_official.py --out docs/bench-official            # both latents, all steps
    python scripts/bench_official.py --out docs/bench-official --skip-int8 --latents f64

Measures, on this CPU (2 threads): ONNX export time and peak RSS of the transformer (its own
process) vs the fp32 weight size; per-step latency (CFG batch 2) of ORT fp32, OpenVINO f32 / bf16 /
INT8 (NNCF, calibrated on trajectories of the model's own DPM-Solver); a whole 30-step 512²
generation + decode (paper f64c128 decoder) at the fastest transformer precision; and the
f64-vs-f32 per-step speed-up the paper's 19x claim rests on. Writes OUT.json, OUT.md, OUT.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcae_edge.timing import run_measured, time_calls  # noqa: E402

RELEASE = {"f64": "dc-ae-f64c128-in-1.0-uvit-h-in-512px", "f32": "dc-ae-f32c32-in-1.0-uvit-h-in-512px"}


def cpu_name() -> str:
    """The CPU model with the ISA extensions that decide the fastest precision."""
    from runtimes.precision import cpu_isa, cpu_model

    return f"{cpu_model()} ({cpu_isa()})"


def write_random_release(folder: Path, latents: str) -> Path:
    import torch

    from dcae_edge.autoencoder import DCAE
    from dcae_edge.denoiser import Denoiser
    from dcae_edge.official import RELEASES, release_denoiser_config, write_release_folder
    from dcae_edge.presets import get_config

    name = RELEASE[latents]
    if (folder / "model.safetensors").is_file():
        return folder
    rel = RELEASES[name]
    torch.manual_seed(0)
    ae = DCAE(get_config(rel.autoencoder)).eval()
    dn = Denoiser(release_denoiser_config(name, rel)).eval()
    write_release_folder(folder, name, ae, dn)
    return folder


def step_latency(pipe, runs: int) -> float:
    import numpy as np

    c, h, w = pipe.recipe["latent_shape"]
    feed = {"hidden_states": np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32), "class_labels": np.array([207, 1000], np.int64)}
    runner = pipe._runner("transformer")
    return round(statistics.median(time_calls(lambda: runner.run(feed), runs)), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench_official"))
    ap.add_argument("--latents", nargs="+", default=["f64", "f32"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--stages", nargs="+", default=["export", "int8", "latency"],
                    help="run only these stages; the others are taken from WORK/progress.json (the heavy exports and "
                         "the calibration can run early, the latencies later on an idle CPU)")
    ap.add_argument("--export-graphs", nargs="+", default=["transformer", "vae_decoder"],
                    help="export stage: re-export only these (the f64 decoder from the release file takes ~20 min)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    progress = work / "progress.json"
    report = json.loads(progress.read_text()) if progress.is_file() else {"rows": {}}
    report.update({"cpu": cpu_name(), "threads": args.threads, "stages_run": {**report.get("stages_run", {}), **{
        s: "python scripts/bench_official.py " + " ".join(sys.argv[1:]) for s in args.stages}}})
    report["command"] = "; ".join(sorted(set(report["stages_run"].values())))

    def save_progress():
        progress.write_text(json.dumps(report, indent=1))
    from runtimes import open_bundle

    for lat in args.latents:
        folder = write_random_release(work / RELEASE[lat], lat)
        bundle = work / f"bundle-{lat}"
        weights_gb = (folder / "model.safetensors").stat().st_size / 1e9
        row = report["rows"].setdefault(lat, {"release": RELEASE[lat], "file_gb": round(weights_gb, 2)})
        graphs = ["transformer", "vae_decoder"] if lat == "f64" else ["transformer"]
        graphs = [g for g in graphs if g in args.export_graphs] if "export" in args.stages else []
        for graph in graphs:
            r = run_measured([sys.executable, "-m", "export.onnx", "--weights", str(folder), "--graphs", graph,
                              "--out", str(bundle)], cwd=ROOT)
            if r["returncode"]:
                print(r["output"][-3000:])
                raise SystemExit(f"export of {graph} failed")
            row[f"onnx_export_{graph}"] = {k: r[k] for k in ("seconds", "peak_rss_gib")}
            print(lat, graph, "onnx export", row[f"onnx_export_{graph}"], flush=True)
            r = run_measured([sys.executable, "-m", "export.openvino", "--weights", str(folder), "--graphs", graph,
                              "--out", str(bundle)], cwd=ROOT)
            row[f"openvino_export_{graph}"] = {k: r[k] for k in ("seconds", "peak_rss_gib", "returncode")}
            print(lat, graph, "openvino export", row[f"openvino_export_{graph}"], flush=True)
            save_progress()
        m = json.loads((bundle / "manifest.json").read_text())
        dn_bytes = sum(v["bytes"] for k, v in m["files"].items() if k.startswith("transformer/model.onnx"))
        row["transformer_fp32_gb"] = round(dn_bytes / 1e9, 2)
        row["export_rss_over_weights"] = round(row["onnx_export_transformer"]["peak_rss_gib"] * 1.0737 / (dn_bytes / 1e9), 2)
        if not args.skip_int8 and "int8" in args.stages:
            r = run_measured([sys.executable, "-m", "calibration", "--bundle", str(bundle), "--backend", "openvino",
                              "--graphs", "transformer", "--num-samples", "60", "--num-eval", "30"], cwd=ROOT)
            row["int8_calibration"] = {k: r[k] for k in ("seconds", "peak_rss_gib", "returncode")}
            print(lat, "int8", row["int8_calibration"], r["output"][-600:], flush=True)
            save_progress()
        if "latency" not in args.stages:
            continue
        lat_ms = {}
        for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")):
            try:
                pipe = open_bundle(bundle, backend, precision, threads=args.threads)
                lat_ms[f"{backend} {precision}"] = step_latency(pipe, args.runs)
            except Exception as e:  # noqa: BLE001 - an artifact this run did not make
                lat_ms[f"{backend} {precision}"] = f"n/a ({type(e).__name__})"
            print(lat, backend, precision, lat_ms[f"{backend} {precision}"], flush=True)
        row["step_ms"] = lat_ms
        numeric = {k: v for k, v in lat_ms.items() if isinstance(v, float)}
        row["best"] = min(numeric, key=numeric.get)
        if lat == "f64":  # a whole generation at the fastest transformer precision, decoded by the paper decoder
            backend, precision = row["best"].split()
            pipe = open_bundle(bundle, backend, precision, threads=args.threads)
            m_art = m["graphs"].get("vae_decoder", {}).get("artifacts", {})
            dec_backend, dec_precision = ("openvino", "bf16") if "openvino/fp32" in m_art else ("onnxruntime", "fp32")
            dec, dec_name = open_bundle(bundle, dec_backend, dec_precision, threads=args.threads), f"{dec_backend} {dec_precision}"
            from dcae_edge import schedules

            t = time.perf_counter()  # what an app does once: read + compile both graphs
            transformer = pipe._runner("transformer")
            dec._runner("vae_decoder")
            t_load = time.perf_counter() - t
            gens = []
            for _ in range(2):  # the first generation after loading (one-shot use), then a warm one
                t = time.perf_counter()
                lat_z = schedules.generate_numpy(pipe.recipe, lambda f: transformer.run(f)[0], [207], 1, 30)
                t_sample = time.perf_counter() - t
                t = time.perf_counter()
                dec.decode(lat_z / pipe.recipe["latent_scaling_factor"])
                t_decode = time.perf_counter() - t
                gens.append({"sampling_s": round(t_sample, 2), "decode_s": round(t_decode, 2),
                             "total_s": round(t_sample + t_decode, 2)})
            row["generation_30_steps"] = {"transformer": row["best"], "decoder": dec_name, "load_s": round(t_load, 2),
                                          **gens[0], "warm": gens[1]}
            print("generation", row["generation_30_steps"], flush=True)
        save_progress()
    if "latency" not in args.stages:
        print(f"stages {args.stages} done; run --stages latency on an idle CPU to finish the report")
        return
    if "f64" in report["rows"] and "f32" in report["rows"]:
        f64, f32 = report["rows"]["f64"]["step_ms"], report["rows"]["f32"]["step_ms"]
        report["f32_over_f64_step"] = {k: round(f32[k] / f64[k], 2) for k in f64 if isinstance(f64.get(k), float)
                                       and isinstance(f32.get(k), float)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out.with_suffix(".md"))
    print(json.dumps(report, indent=1))


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Released-generator benchmark: UViT-H at 512² (random weights, released layout)", "",
             f"CPU: {report['cpu']}, {report['threads']} threads. Command: `{report['command']}`", "",
             "| latents | tokens | ONNX export (transformer) | peak RSS | RSS / fp32 weights | ORT fp32 | OV f32 | OV bf16 | OV int8 | best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for lat, r in report["rows"].items():
        ms = r["step_ms"]
        cell = lambda k: f"{ms[k]:.0f} ms" if isinstance(ms.get(k), float) else str(ms.get(k, "—"))  # noqa: E731
        ex = r["onnx_export_transformer"]
        lines.append(f"| {lat} | {'64' if lat == 'f64' else '256'} (+2) | {ex['seconds']} s | {ex['peak_rss_gib']} GiB | "
                     f"{r['export_rss_over_weights']}x | {cell('onnxruntime fp32')} | {cell('openvino fp32')} | "
                     f"{cell('openvino bf16')} | {cell('openvino int8')} | {r['best']} |")
    g = report["rows"].get("f64", {}).get("generation_30_steps")
    if g:
        lines += ["", f"Whole 30-step 512² generation (f64, DPM-Solver++ 3S, CFG 1.5, batch 2 per step), models loaded "
                  f"first ({g['load_s']} s: read + compile both graphs, once per app start):", "",
                  "| | sampling | decode | total |", "|---|---|---|---|",
                  f"| first generation after loading | {g['sampling_s']} s ({g['transformer']}) | {g['decode_s']} s "
                  f"({g['decoder']}) | **{g['total_s']} s** |"]
        if g.get("warm"):
            w = g["warm"]
            lines.append(f"| the next generation | {w['sampling_s']} s | {w['decode_s']} s | **{w['total_s']} s** |")
    cal = report["rows"].get("f64", {}).get("int8_calibration")
    if cal:
        lines += ["", f"OpenVINO INT8 calibration of the transformer (NNCF on the model's own DPM-Solver trajectories, "
                  f"60 feeds, 30 held-out): {cal['seconds']} s, peak RSS {cal['peak_rss_gib']} GiB."]
    if report.get("f32_over_f64_step"):
        lines += ["", "Per-step time f32c32 (256 tokens) / f64c128 (64 tokens): "
                  + ", ".join(f"{k} {v}x" for k, v in report["f32_over_f64_step"].items())]
    d = report["rows"].get("f64", {}).get("onnx_export_vae_decoder")
    if d:
        lines += ["", f"Paper f64c128 decoder ONNX export: {d['seconds']} s, peak RSS {d['peak_rss_gib']} GiB."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
