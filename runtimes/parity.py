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

from dcae_edge.cli import short_warnings
from dcae_edge.compare import compare, passes

from .backends import RuntimeUnavailable
from .pipeline import BundleError, Pipeline, read_manifest
from .precision import gate_family, openvino_artifacts, openvino_precisions
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
        return [("openvino", p) for p in openvino_precisions(prec)]
    if fmt == "coreml":
        return [("coreml", {"int8w": "int8"}.get(prec, prec))]
    return []


def tolerance(manifest: dict, graph: str, precision: str) -> dict:
    if gate_family(precision) == "int8":  # the calibration gates, whatever the float remainder runs at
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


def _golden_shape_ok(dims: list, shape: tuple) -> bool:
    return len(dims) == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(dims, shape))


def check_golden(bundle: Path, backend: str = "onnxruntime", precision: str = "fp32", format: str = "onnx",
                 verify: bool = True, device: str = "cpu") -> dict:
    """Every graph on the bundle's golden inputs, each traced model call, and the whole generation
    from the golden noise, against the golden torch outputs (golden/tolerances.json)."""
    from safetensors.numpy import load_file

    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=verify)
    if "golden" not in manifest:
        raise BundleError(f"{bundle} has no golden vectors: python -m export.golden --bundle {bundle}")
    tol_all = json.loads((bundle / "golden" / "tolerances.json").read_text())["tolerances"]
    pipe = Pipeline(bundle, backend, precision, device, verify=verify, format=format)
    rows, ok = [], True

    def row(what: str, ref: np.ndarray, out: np.ndarray, tol: dict) -> None:
        nonlocal ok
        m = compare(ref, out)
        good = passes(m, tol)
        ok &= good
        rows.append({"what": what, "pass": bool(good), "tolerance": tol, **{k: v for k, v in m.items() if k != "ref_max_abs"}})

    def tolerance_for(graph: str) -> dict:
        return INT8_GATES[graph] if gate_family(precision) == "int8" else tolerance(manifest, graph, precision)

    def run_graph(graph: str, feeds: dict) -> np.ndarray:
        runner = pipe._runner(graph)
        batch = 2 if graph == "transformer" else 1
        return pipe._run_batched(runner, feeds, batch if pipe._fixed_shapes else None)

    for graph in ("vae_encoder", "vae_decoder", "transformer"):
        path = bundle / "golden" / f"{graph}.safetensors"
        if not path.is_file() or graph not in manifest["graphs"]:
            continue
        t = load_file(str(path))
        spec = manifest["graphs"][graph]
        for inp in spec["inputs"]:
            if inp["name"] not in t or not _golden_shape_ok(inp["shape"], t[inp["name"]].shape):
                raise BundleError(f"golden vectors golden/{graph}.safetensors: {inp['name']} has shape "
                                  f"{tuple(t[inp['name']].shape) if inp['name'] in t else 'missing'}, the bundle's {graph} "
                                  f"takes {inp['shape']}: the golden files belong to another bundle (re-run python -m export.golden)")
        out_name = spec["outputs"][0]["name"]
        row(graph, t[out_name], run_graph(graph, {i["name"]: t[i["name"]] for i in spec["inputs"]}), tolerance_for(graph))
    gen_path = bundle / "golden" / "generation.safetensors"
    if gen_path.is_file():
        g = load_file(str(gen_path))
        calls = sorted({int(k.split(".")[0][4:]) for k in g if k.startswith("call")})
        refs, outs = [], []
        for k in calls:
            feeds = {n: g[f"call{k}.{n}"] for n in ("hidden_states", "timestep", "class_labels")}
            refs.append(g[f"call{k}.sample"])
            outs.append(run_graph("transformer", feeds))
        row("generation: model calls", np.concatenate(refs), np.concatenate(outs), tolerance_for("transformer"))
        meta = manifest["golden"]
        images, z = pipe.generate(meta.get("classes"), seed=meta.get("seed", 0), latents=g["noise"], return_latents=True,
                                  n=g["noise"].shape[0])
        gen_tol = tol_all["generation"].get(gate_family(precision), tol_all["generation"]["fp32"])
        row("generation: latents", g["latents"], z, gen_tol)
        if "image" in g:
            row("generation: image", g["image"], images, gen_tol)
    return {"bundle": str(bundle), "backend": backend, "precision": precision, "format": format, "pass": bool(ok),
            "rows": rows}


def semantic_runtimes(manifest: dict) -> list[tuple[str, str, dict, str]]:
    """(backend, label, per-graph precision, format) for every transformer artifact this machine can
    run; the decoder runs at the same precision when the bundle has it, else fp32."""
    out = []
    dec = manifest["graphs"].get("vae_decoder", {}).get("artifacts", {})
    for key in sorted(manifest["graphs"]["transformer"]["artifacts"]):
        for backend, precision in combos(key):
            if backend == "coreml" and platform.system() != "Darwin":
                continue
            prefix = {"onnxruntime": "onnx", "openvino": "openvino"}.get(backend, backend)
            dkey = openvino_artifacts(precision)[0] if backend == "openvino" else f"{prefix}/{precision}"
            dprec = precision if dkey in dec else "fp32"
            out.append((backend, f"{backend} {precision}" + (f" (decoder {dprec})" if dprec != precision else ""),
                        {"transformer": precision, "vae_decoder": dprec}, "onnx"))
    arts = manifest["graphs"]["transformer"]["artifacts"]
    # export.mobile's files, as a phone app ships them: ORT format (run with format="ort") and ExecuTorch
    for prefix, backend, what, fmt in (("ort", "onnxruntime", " (ORT format)", "ort"), ("pte", "executorch", "", "onnx")):
        for p in ("fp32", "fp16", "int8"):
            if f"{prefix}/{p}" in arts:
                dprec = p if f"{prefix}/{p}" in dec else "fp32"
                out.append((backend, f"{backend} {p}{what}" + (f" (decoder {dprec})" if dprec != p else ""),
                            {"transformer": p, "vae_decoder": dprec}, fmt))
    return out


def semantic_parity(bundle: Path, per_class: int, out: Path, weights: str | None = None, device: str = "cpu") -> dict:
    """Class accuracy (digit judge) of the same seeded generations through every runtime and
    precision of the bundle, and through torch when its weights are at hand; a grid PNG each."""
    from PIL import Image

    from dcae_edge.judge import Judge, semantic_score

    manifest = read_manifest(bundle, verify=True)
    if "transformer" not in manifest["graphs"] or not manifest.get("denoiser"):
        raise BundleError(f"{bundle} has no denoiser to score")
    classes = list(range(manifest["denoiser"]["config"]["num_classes"]))
    judge = Judge()
    out.mkdir(parents=True, exist_ok=True)
    runs = [("torch", "torch fp32", "fp32", "onnx")] + semantic_runtimes(manifest)
    rows = []
    for backend, label, precision, fmt in runs:
        try:
            pipe = Pipeline(bundle, backend, precision, device, weights=weights, format=fmt)
            report, grid = semantic_score(lambda labels, seed: pipe.generate(labels, seed=seed), classes, per_class, judge)
        except (RuntimeUnavailable, BundleError) as e:
            rows.append({"runtime": label, "status": "skipped", "reason": str(e).splitlines()[0]})
            print(f"  {label}: skipped ({str(e).splitlines()[0]})")
            continue
        name = label.replace(" ", "_").replace("(", "").replace(")", "").replace("ORT_format", "ort")
        Image.fromarray(grid).save(out / f"{name}.jpg", quality=90)  # docs-sized
        rows.append({"runtime": label, "status": "ok", "grid": f"{name}.jpg", **report})
        print(f"  {label}: accuracy {report['accuracy']:.3f}  {report['per_class']}", flush=True)
    ref = next((r["accuracy"] for r in rows if r["runtime"] == "torch fp32" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            r["pass"] = r["accuracy"] >= 0.90 and (ref is None or r["accuracy"] >= ref - 0.03)
    result = {"bundle": str(bundle), "per_class": per_class, "judge_heldout_accuracy": judge.meta.get("heldout_accuracy"),
              "torch_accuracy": ref, "rows": rows, "pass": all(r.get("pass", True) for r in rows)}
    (out / "semantic.json").write_text(json.dumps(result, indent=1))
    lines = [f"Digit-judge accuracy of {per_class} generations per class through every runtime (same seeds, so the "
             f"same starting noise); judge held-out accuracy {result['judge_heldout_accuracy']}. Pass: >= 90% and "
             "within 3 points of torch.", "", "| runtime | accuracy | per class | grid |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['runtime']} | **{100 * r['accuracy']:.1f}%** {'✓' if r['pass'] else '✗'} | "
                         + " ".join(f"{k}:{100 * v:.0f}" for k, v in r["per_class"].items()) + f" | ![]({r['grid']}) |")
        else:
            lines.append(f"| {r['runtime']} | skipped | {r['reason']} | |")
    (out / "semantic.md").write_text("\n".join(lines) + "\n")
    return result


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
    ap.add_argument("--reference", type=Path, default=None, help="a torch reference file (python -m runtimes.reference)")
    ap.add_argument("--golden", action="store_true", help="check against the bundle's own golden vectors instead")
    ap.add_argument("--backend", default="onnxruntime", help="--golden: the backend to check")
    ap.add_argument("--precision", default="fp32", help="--golden: the precision to check")
    ap.add_argument("--format", default="onnx", help="--golden: onnx | ort | ort-runtime (onnxruntime)")
    ap.add_argument("--semantic", type=int, default=0, metavar="N",
                    help="digit generators: judge N generations per class through every runtime (writes OUT/semantic.md)")
    ap.add_argument("--weights", default=None, help="--semantic: the torch weights for the torch row (bundled: found)")
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="report path without suffix (default BUNDLE/parity)")
    args = ap.parse_args(argv)
    short_warnings()
    if args.semantic:
        try:
            result = semantic_parity(args.bundle, args.semantic, Path(args.out or args.bundle / "semantic"), args.weights,
                                     args.device)
        except (BundleError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{'PASS' if result['pass'] else 'FAIL'}: semantic parity written to {args.out or args.bundle / 'semantic'}")
        return 0 if result["pass"] else 1
    if args.golden:
        try:
            report = check_golden(args.bundle, args.backend, args.precision, args.format, device=args.device)
        except (BundleError, RuntimeUnavailable, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for r in report["rows"]:
            print(f"  [{'✓' if r['pass'] else '✗'}] {r['what']}: max abs {r['max_abs']:.2e}, PSNR {r['psnr']:.1f} dB, "
                  f"cosine {r['cosine']:.6f}  (tolerance {r['tolerance']})")
        print(f"{'PASS' if report['pass'] else 'FAIL'}: {args.backend} {args.precision} ({args.format}) against "
              f"{args.bundle}/golden")
        return 0 if report["pass"] else 1
    if args.reference is None:
        ap.error("pass --reference FILE or --golden")
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
