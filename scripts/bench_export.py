"""Export benchmark (not a test): export time, peak RAM, file sizes, node counts before/after
simplification, ORT-vs-torch error on real photos at two resolutions, and latency of torch vs
onnxruntime vs OpenVINO (f32 / bf16), for a bundle of one model.

    python scripts/bench_export.py --variant f64 --out docs/export-f64-edge              # bundled edge model
    python scripts/bench_export.py --variant f64 --weights random:dc-ae-f64c128-in-1.0 \
        --graphs vae_decoder --out docs/export-f64c128-paper --runs 2                    # paper size, random

Each export runs in a child process so that its peak RSS is measured on its own.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcae_edge.cpu import cpu_isa, cpu_model  # noqa: E402
from dcae_edge.timing import run_measured, time_calls  # noqa: E402


def run_child(cmd: list[str]) -> tuple[float, float, int]:
    """Wall time and this child's own peak RSS (os.wait4; RUSAGE_CHILDREN was the max over all)."""
    r = run_measured(cmd, cwd=ROOT)
    if r["returncode"] != 0:
        print(r["output"][-6000:])
    return r["seconds"], r["peak_rss_gib"], r["returncode"]


def latency(fn, runs: int) -> float:
    return round(statistics.median(time_calls(fn, runs)), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="f64")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--graphs", nargs="+", default=["vae_encoder", "vae_decoder"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--bundle", default=None, help="bundle folder (default .cache/bench_export/<out name>)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    bundle = Path(args.bundle or ROOT / ".cache" / "bench_export" / out.name)
    common = ["--variant", args.variant, "--out", str(bundle), "--resolution", str(args.resolution),
              "--denoiser", "none", "--graphs", *args.graphs] + (["--weights", args.weights] if args.weights else [])
    report = {"variant": args.variant, "weights": args.weights or "bundled", "resolution": args.resolution,
              "threads": args.threads, "cpu": cpu_model(), "isa": cpu_isa(),
              "command": "python scripts/bench_export.py " + " ".join(sys.argv[1:])}
    wall, rss, rc = run_child([sys.executable, "-m", "export.onnx", *common])
    report["onnx_export"] = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2), "rc": rc}
    if not args.no_openvino and rc == 0:
        wall, rss, rc2 = run_child([sys.executable, "-m", "export.openvino", *common])
        report["openvino_export"] = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2), "rc": rc2}
    if rc != 0:
        raise SystemExit(f"export failed (rc {rc})")
    manifest = json.loads((bundle / "manifest.json").read_text())

    import torch

    from dcae_edge.checkpoints import load_autoencoder
    from dcae_edge.data import sample_photos
    from runtimes.backends import OpenVinoGraph, OrtGraph

    torch.set_num_threads(args.threads)
    ae = load_autoencoder(args.weights or manifest["autoencoder"]["source"])  # random: weights do not matter for timing
    graphs = {}
    for g in args.graphs:
        info = manifest["graphs"][g]
        onnx_art = info["artifacts"]["onnx/fp32"]
        size = sum(manifest["files"][p]["bytes"] for p in manifest["files"] if p.startswith(g + "/model.onnx")) / 1e6
        row = {"onnx_mb": round(size, 1), "nodes_before": onnx_art["nodes_before"], "nodes_after": onnx_art["nodes_after"],
               "simplifier": onnx_art["simplifier"], "export_s": onnx_art["seconds"],
               "ort_vs_torch": [{"sizes": r["sizes"], "max_abs": r["max_abs"], "psnr": round(r["psnr"], 1)}
                                for r in onnx_art["validation"]["results"]]}
        if "openvino/fp32" in info["artifacts"]:
            ova = info["artifacts"]["openvino/fp32"]
            row["openvino_mb"] = round(sum(manifest["files"][p]["bytes"] for p in ova["files"]) / 1e6, 1)
            row["openvino_convert_s"] = ova["seconds"]
            row["openvino_f32_max_abs"] = max(r["max_abs"] for r in ova["validation"]["results"])
            vb = ova.get("validation_bf16", {})
            if vb.get("results"):
                row["openvino_bf16_psnr"] = round(min(r["psnr"] for r in vb["results"]), 1)
        # latency at the export resolution, batch 1
        x = sample_photos(args.resolution, 1)
        feed = x if g == "vae_encoder" else ae.encoder(x).detach()
        name = "sample" if g == "vae_encoder" else "latent_sample"
        mod = ae.encoder if g == "vae_encoder" else ae.decoder
        with torch.no_grad():
            row["torch_ms"] = latency(lambda: mod(feed), args.runs)
        ort_run = OrtGraph(bundle / onnx_art["files"][0], "cpu", args.threads)
        row["ort_ms"] = latency(lambda: ort_run.run({name: feed.numpy()}), args.runs)
        if "openvino/fp32" in info["artifacts"]:
            for hint in ("f32", "bf16"):
                ov_run = OpenVinoGraph(bundle / info["artifacts"]["openvino/fp32"]["files"][0], "CPU", hint, args.threads)
                row[f"openvino_{hint}_ms"] = latency(lambda: ov_run.run({name: feed.numpy()}), args.runs)
        graphs[g] = row
        print(g, json.dumps(row), flush=True)
    report["graphs"] = graphs
    report["parameters"] = sum(p.numel() for p in ae.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"Export benchmark: {manifest['autoencoder']['name']} ({report['parameters']:,} parameters, weights "
             f"{report['weights']}) at {args.resolution}px, {args.threads} threads, {report['cpu']} ({report['isa']}). "
             f"Command: `{report['command']}`", "",
             f"ONNX export (all graphs, its own process): {report['onnx_export']['wall_s']} s wall, peak RSS "
             f"{report['onnx_export']['peak_rss_gib']} GiB"
             + (f"; OpenVINO conversion: {report['openvino_export']['wall_s']} s, peak RSS "
                f"{report['openvino_export']['peak_rss_gib']} GiB" if "openvino_export" in report else "") + ".", "",
             "| graph | ONNX MB | nodes before -> after | ORT vs torch max abs (sizes) | OV MB | OV f32 max abs | OV bf16 PSNR dB "
             "| torch ms | ORT ms | OV f32 ms | OV bf16 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g, r in graphs.items():
        unit = ae.spatial_compression if g == "vae_decoder" else 1  # decoder sizes are latent cells
        errs = "; ".join(f"{e['max_abs']:.1e} ({e['sizes']['height'] * unit}x{e['sizes']['width'] * unit}px)"
                         for e in r["ort_vs_torch"])
        lines.append(f"| {g} | {r['onnx_mb']} | {r['nodes_before']} -> {r['nodes_after']} ({r['simplifier']}) | {errs} | "
                     f"{r.get('openvino_mb', '')} | {r.get('openvino_f32_max_abs', ''):{'.1e' if 'openvino_f32_max_abs' in r else ''}} | "
                     f"{r.get('openvino_bf16_psnr', '')} | {r['torch_ms']} | {r['ort_ms']} | {r.get('openvino_f32_ms', '')} | "
                     f"{r.get('openvino_bf16_ms', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
