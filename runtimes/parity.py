"""Parity suite: every artifact of a bundle (backend x precision x graph) against a torch reference
file made on CUDA or CPU (``python -m runtimes.reference``).

    python -m runtimes.parity --bundle exports/f64 --reference tests/references/f64-cuda.safetensors --out docs/parity-f64

Metrics per artifact: max/mean abs, relative L2, cosine, PSNR, non-finite count, pass/fail against
per-precision thresholds (fp32: max abs <= 1e-4 on images, 1e-4 + 1e-5 x max|ref| on tensors;
fp16 >= 40 dB; OpenVINO bf16 >= 35 dB; INT8: the calibration gates). Also runs the seeded
end-to-end generation. Writes JSON + Markdown; exits 1 if anything fails. Runs unchanged on a
Mac (Core ML artifacts are checked there, skipped elsewhere) and on a CUDA box (--device cuda).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from dcae_edge.compare import compare, passes

from .backends import RuntimeUnavailable
from .pipeline import BundleError, Pipeline, read_manifest
from .reference import load_reference

INT8_GATES = {"vae_decoder": {"min_psnr": 32.0}, "vae_encoder": {"min_cosine": 0.99}, "transformer": {"min_cosine": 0.99}}
GRAPH_IO = {"vae_encoder": ("sample", "latent_sample"), "vae_decoder": ("latent_sample", "sample"),
            "transformer": (("hidden_states", "timestep", "class_labels"), "sample")}


def combos(artifact_key: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs that exercise one artifact."""
    fmt, prec = artifact_key.split("@")[0].split("/")
    if fmt == "onnx":
        return [("onnxruntime", prec)]
    if fmt == "openvino":
        return [("openvino", "fp32"), ("openvino", "bf16")] if prec in ("fp32", "fp16w") else [("openvino", prec)]
    if fmt == "coreml":
        return [("coreml", {"int8w": "int8"}.get(prec, prec))]
    return []


def tolerance(manifest: dict, graph: str, precision: str) -> dict:
    if precision == "int8":
        gates = (manifest["graphs"][graph].get("int8_gates") or INT8_GATES[graph])
        return dict(gates)
    tols = manifest["graphs"][graph].get("tolerances", {})
    return tols.get(precision) or {"fp32": {"max_abs": 1e-4, "rel": 1e-5}, "fp16": {"min_psnr": 40.0},
                                   "bf16": {"min_psnr": 35.0}}[precision]


def run_parity(bundle: Path, reference: Path, backends: list[str] | None = None, device: str = "cpu") -> dict:
    tensors, meta = load_reference(reference)
    manifest = read_manifest(bundle, verify=True)
    if meta.get("autoencoder_fingerprint") != manifest["autoencoder"]["fingerprint"]:
        raise BundleError(f"{reference} was made for other autoencoder weights ({meta.get('autoencoder')}, "
                          f"{meta.get('autoencoder_fingerprint')}) than {bundle} ({manifest['autoencoder']['fingerprint']})")
    dn_ok = manifest.get("denoiser") and meta.get("denoiser_fingerprint") == manifest["denoiser"]["fingerprint"]
    rows = []
    pipes: dict = {}
    for graph, (ins, out_name) in GRAPH_IO.items():
        if graph not in manifest["graphs"] or f"{graph}.{out_name}" not in tensors:
            continue
        if graph == "transformer" and not dn_ok:
            rows.append({"graph": graph, "status": "skipped", "reason": "reference made for another denoiser"})
            continue
        ins = ins if isinstance(ins, tuple) else (ins,)
        feeds = {n: tensors[f"{graph}.{n}"] for n in ins}
        ref = tensors[f"{graph}.{out_name}"]
        for key in sorted(manifest["graphs"][graph]["artifacts"]):
            for backend, precision in combos(key):
                if backends and backend not in backends:
                    continue
                row = {"graph": graph, "artifact": key, "backend": backend, "precision": precision}
                try:
                    pipe = pipes.setdefault((backend, precision), Pipeline(bundle, backend, precision, device))
                    res = int(meta["resolution"]) if graph != "transformer" else None
                    art_key, _ = pipe._artifact(graph, res)
                    if art_key != key:
                        continue  # this precision resolves to another artifact of the graph
                    runner = pipe._runner(graph, res)
                    static = getattr(runner, "static", False)
                    if static and graph != "transformer" and res != manifest["resolution"] and backend != "coreml":
                        raise BundleError(f"static graph at {manifest['resolution']}px, reference at {res}px")
                    out = pipe._run_batched(runner, feeds, (2 if graph == "transformer" else 1) if static else None)
                except (RuntimeUnavailable, BundleError) as e:
                    rows.append({**row, "status": "skipped", "reason": str(e).splitlines()[0]})
                    continue
                m = compare(ref, out)
                tol = tolerance(manifest, graph, precision)
                rows.append({**row, "status": "pass" if passes(m, tol) else "FAIL", "tolerance": tol,
                             **{k: v for k, v in m.items() if k != "ref_max_abs"}})
    if dn_ok and "generate.latents" in tensors and "onnx/fp32" in manifest["graphs"]["transformer"]["artifacts"]:
        g = meta["generate"]
        pipe = pipes.setdefault(("onnxruntime", "fp32"), Pipeline(bundle, "onnxruntime", "fp32", device))
        try:
            imgs, lat = pipe.generate(g["class_labels"], g["steps"], g["cfg_scale"], g["seed"], g["sampler"],
                                      n=g["n"], return_latents=True)
            ml, mi = compare(tensors["generate.latents"], lat), compare(tensors["generate.images"], np.clip(imgs, -1, 1))
            rows.append({"graph": "generate (end to end)", "artifact": "onnx/fp32 x3", "backend": "onnxruntime",
                         "precision": "fp32", "status": "pass" if passes(ml, {"max_abs": 1e-3, "rel": 1e-4}) and
                         mi["psnr"] >= 40 else "FAIL", "tolerance": {"latents max_abs": 1e-3, "images min_psnr": 40},
                         **{k: v for k, v in ml.items() if k != "ref_max_abs"}, "image_psnr": mi["psnr"]})
        except (BundleError, RuntimeUnavailable) as e:
            rows.append({"graph": "generate (end to end)", "status": "skipped", "reason": str(e)})
    return {"bundle": str(bundle), "reference": str(reference), "reference_device": meta.get("device_name"),
            "reference_torch": meta.get("torch"), "host": f"{platform.system()} {platform.machine()}",
            "rows": rows, "pass": all(r["status"] != "FAIL" for r in rows)}


def to_markdown(report: dict) -> str:
    lines = [f"Parity of `{report['bundle']}` against the torch reference `{report['reference']}` "
             f"(made on {report['reference_device']}, torch {report['reference_torch']}); host {report['host']}.", "",
             "| graph | artifact | backend | precision | max abs | mean abs | rel L2 | cosine | PSNR dB | non-finite | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] == "skipped":
            lines.append(f"| {r['graph']} | {r.get('artifact', '')} | {r.get('backend', '')} | {r.get('precision', '')} "
                         f"| | | | | | | skipped: {r['reason']} |")
        else:
            lines.append(f"| {r['graph']} | {r['artifact']} | {r['backend']} | {r['precision']} | {r['max_abs']:.2e} | "
                         f"{r['mean_abs']:.2e} | {r['rel_l2']:.2e} | {r['cosine']:.6f} | {r['psnr']:.1f} | "
                         f"{r['nonfinite']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--reference", required=True, type=Path)
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="report path without suffix (default BUNDLE/parity)")
    args = ap.parse_args(argv)
    try:
        report = run_parity(args.bundle, args.reference, args.backends, args.device)
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.bundle / "parity")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"{'PASS' if report['pass'] else 'FAIL'}: wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
