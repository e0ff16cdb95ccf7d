"""Export DC-AE encoder/decoder (and the denoiser) to Core ML ML programs (.mlpackage).

    python -m export.coreml --variant f64                          # -> exports/f64/<graph>/model.mlpackage
    python -m export.coreml --variant f64 --resolution 512 256     # + vae_*/model_256.mlpackage
    python -m export.coreml --variant f64 --quantize-weights int8  # + <graph>/model_int8w.mlpackage

Path: ``torch.export.export(spec.module).run_decompositions({})`` -> ``ct.convert(mlprogram,
iOS17)`` (pixel_unshuffle needs iOS16+). Names, shapes and dtypes come from the shared GraphSpecs;
Core ML has no int64, so ``class_labels`` is declared int32 (MIL holds every integer as int32:
no wrapper is needed, the spec checks below confirm the input type).

Shapes: fixed, one package per resolution. The first --resolution is the bundle's (the one
export.onnx/export.openvino use; the transformer and ``model.mlpackage`` are built at it), each
further one adds ``vae_*/model_<res>.mlpackage``. Measured alternative: a dynamic torch.export
converted with ``ct.EnumeratedShapes`` converts (f64 encoder: export 22 s instead of 2.6 s), but
(1) DC-AE picks linear or quadratic attention per stage from H*W at trace time, so only sizes
with the same ``spec.branch_pattern`` may share a graph (f64: 256px and 512px do not),
(2) its predictions cannot be checked on Linux and EnumeratedShapes models are reported to
mis-predict (coremltools #2730), (3) fixed shapes are what runs on the Neural Engine
(huggingface/exporters #37 made them the default). --static/--dynamic only select the bundle the
packages join (default: the existing bundle's); Core ML packages always have fixed shapes.

Precision (--precision fp16, default): FLOAT16 compute with the spec's ``fp16_keep_ops``
(RMSNorm and linear-attention maths; LayerNorm/softmax/sinusoids for the denoiser) kept fp32,
mapped to MIL op types, plus the glue ops sandwiched between them (the slices of the attention
output before its clamp/division, the ``+ eps`` before rsqrt): a cast to fp16 there would
overflow the unnormalised attention sums or flush the 1e-15 clamp to zero. --precision fp32
keeps everything fp32.

Checks: Linux cannot run Core ML, so every package is reloaded (``skip_model_load``) and its
spec checked (input/output names, shapes, dtypes; per-op compute precision counted), and the
exported torch program is validated against torch eager. On macOS the packages are also run and
validated against torch (fp16: PSNR >= 40 dB); elsewhere that step is recorded as skipped.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dcae_edge.cli import at_least

from .bundle import bundle_transaction, package_versions, read_manifest, record_artifact, write_manifest
from .common import (ExportError, ValidationFailed, add_common_args, build_specs, default_out, export_sizes, load_models, notice,
                     prepare_manifest, resolve_resolution, run_cli, summarize, validate)
if TYPE_CHECKING:
    from .specs import GraphSpec

COREML_DTYPES = {"float32": np.float32, "int64": np.int32}       # Core ML has no int64 inputs
ARRAY_DTYPES = {"float32": "FLOAT32", "int64": "INT32"}          # what the package must declare
# ONNX op types of spec.fp16_keep_ops -> the MIL ops the same maths becomes after ct.convert
MIL_OPS = {"MatMul": ("matmul",), "Div": ("real_div",), "Pow": ("pow",), "ReduceMean": ("reduce_mean",),
           "Sqrt": ("sqrt", "rsqrt"), "Reciprocal": ("inverse", "rsqrt"), "Clip": ("clip", "maximum"),
           "Max": ("maximum",), "LayerNormalization": ("layer_norm",), "Softmax": ("softmax",),
           "Sin": ("sin",), "Cos": ("cos",), "Exp": ("exp",)}
# kept fp32 only when fed by a kept op: RMSNorm's mean of squares, not the down-shortcut's
# channel-group average (a mean of a few activations, safe in fp16; fp32 there only adds casts)
NEIGHBOUR_OPS = ("reduce_mean",)
COMPRESSIONS = {"int8": "int8w", "palettize4": "pal4"}           # --quantize-weights -> file/key suffix
DESCRIPTIONS = {
    ("vae_encoder", "sample"): "RGB images, NCHW float32 in [-1, 1]",
    ("vae_encoder", "latent_sample"): "unscaled latents (multiply by scaling_factor before the denoiser)",
    ("vae_decoder", "latent_sample"): "unscaled latents (divide denoiser latents by scaling_factor first)",
    ("vae_decoder", "sample"): "RGB images, NCHW float32 in about [-1, 1]",
    ("transformer", "hidden_states"): "noisy scaled latents (CFG: conditional and null-class halves)",
    ("transformer", "timestep"): "timestep per sample, float in [0, 1000]",
    ("transformer", "class_labels"): "class id per sample (int32; num_classes = null class for CFG)",
    ("transformer", "sample"): "model prediction (velocity for flow models, noise for eps models)",
}


@contextlib.contextmanager
def quiet():
    """coremltools' import/convert noise: version warnings, missing-runtime proxies on Linux,
    tqdm progress bars (stderr), torch.export and fp16-cast warnings. Errors still show."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            log.setLevel(level)


def import_coremltools():
    with quiet():  # the import itself logs the sklearn/torch version and missing-proxy warnings
        import coremltools
    return coremltools


def keep_fp32(spec: GraphSpec):
    """FP16ComputePrecision op_selector (True = compute in fp16) keeping the spec's delicate ops fp32."""
    keep = {m for op in spec.fp16_keep_ops for m in MIL_OPS.get(op, ())}

    def kept(var) -> bool:
        # the pass walks ops in order: a producer seen here was kept (an op moved to fp16 is
        # replaced and its consumers read a cast), consumers are still the original ops
        return var.op is not None and var.op.op_type in keep

    def selector(op) -> bool:
        ins = [v for vs in op.inputs.values() for v in (vs if isinstance(vs, (list, tuple)) else [vs])
               if v.op is None or v.op.op_type != "const"]
        if op.op_type in NEIGHBOUR_OPS and op.op_type in keep:
            return not any(kept(v) for v in ins)
        if op.op_type in keep:
            return False
        # glue between kept ops (slice between matmul and division, "+ eps" before rsqrt) stays fp32 too
        feeds_kept = any(c.op_type in keep for o in op.outputs for c in o.child_ops)
        return not (ins and all(kept(v) for v in ins) and feeds_kept)

    return selector


def convert_graph(spec: GraphSpec, sizes: dict, precision: str):
    """(mlmodel, exported program, info): torch.export at a fixed shape, then ct.convert."""
    import torch

    ct = import_coremltools()
    feeds = spec.trace_inputs(sizes)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    t0 = time.perf_counter()
    with quiet():
        ep = torch.export.export(spec.module, args).run_decompositions({})
    t1 = time.perf_counter()
    compute = ct.precision.FLOAT32 if precision == "fp32" else ct.transform.FP16ComputePrecision(op_selector=keep_fp32(spec))
    try:
        with quiet():
            ml = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                            inputs=[ct.TensorType(name=t.name, shape=t.shape_for(sizes), dtype=COREML_DTYPES[t.dtype])
                                    for t in spec.inputs],
                            outputs=[ct.TensorType(name=t.name, dtype=np.float32) for t in spec.outputs],
                            compute_precision=compute)
    except Exception as e:  # noqa: BLE001 - report the converter's first line, not its traceback
        raise ExportError(f"{spec.name}: ct.convert failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    return ml, ep, {"export_seconds": round(t1 - t0, 1), "convert_seconds": round(time.perf_counter() - t1, 1)}


def set_metadata(ml, spec: GraphSpec, sizes: dict, res: int | None, scaling_factor: float, model_info: dict,
                 precision: str) -> None:
    from dcae_edge import __version__

    ml.short_description = (f"dcae-edge {spec.name} of {model_info['name']}"
                            + (f" at {res}px" if res else "") + f", {precision} compute")
    ml.author = "dcae-edge"
    ml.license = f"weights: {model_info['source']} (see that source's license)"
    ml.version = __version__
    meta = {"graph": spec.name, "scaling_factor": str(scaling_factor), "toolkit_version": __version__,
            "precision": precision, "fingerprint": model_info["fingerprint"],
            "inputs": json.dumps({t.name: list(t.shape_for(sizes)) for t in spec.inputs}),
            "outputs": json.dumps({t.name: list(t.shape_for(sizes)) for t in spec.outputs})}
    if res:
        meta["resolution"] = str(res)
        meta["attention_branches"] = json.dumps(spec.branch_pattern(sizes["height"], sizes["width"]))
    ml.user_defined_metadata.update(meta)
    for t in spec.inputs:
        ml.input_description[t.name] = DESCRIPTIONS.get((spec.name, t.name), t.name)
    for t in spec.outputs:
        ml.output_description[t.name] = DESCRIPTIONS.get((spec.name, t.name), t.name)


def save(ml, path: Path) -> None:
    if path.exists():  # the staging copy hard-links the live bundle: replace, never rewrite in place
        shutil.rmtree(path)
    with quiet():
        ml.save(str(path))


def op_precisions(block) -> dict:
    """Per-op compute precision of a MIL block (output dtype; consts and casts counted apart)."""
    from coremltools.proto import MIL_pb2

    counts, fp32_types = collections.Counter(), collections.Counter()
    for op in block.operations:
        if op.type == "const" or op.type.startswith("constexpr_"):
            counts["weights" if op.type.startswith("constexpr_") else "const"] += 1
            continue
        if op.type == "cast":
            counts["cast"] += 1
            continue
        dt = MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType) if op.outputs else "NONE"
        kind = {"FLOAT16": "fp16", "FLOAT32": "fp32"}.get(dt, "other")
        counts[kind] += 1
        if kind == "fp32":
            fp32_types[op.type] += 1
    return {**dict(counts), "fp32_op_types": dict(fp32_types.most_common())}


def spec_checks(path: Path, spec: GraphSpec, sizes: dict) -> dict:
    """Reload the saved package without Core ML (Linux) and check its interface and MIL program."""
    ct = import_coremltools()
    from coremltools.proto import FeatureTypes_pb2

    with quiet():
        pb = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    dtype_name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    func = pb.mlProgram.functions["main"]
    block = func.block_specializations[func.opset]
    program_shapes = {o.name: [d.constant.size for d in o.type.tensorType.dimensions]
                      for op in block.operations for o in op.outputs}
    problems = []

    def check(kind, features, tensors):
        got = [f.name for f in features]
        if got != [t.name for t in tensors]:
            problems.append(f"{kind} names {got} != spec {[t.name for t in tensors]}")
        rows = []
        for f, t in zip(features, tensors):
            shape = list(f.type.multiArrayType.shape) or program_shapes.get(f.name)
            dtype = dtype_name(f.type.multiArrayType.dataType)
            want = list(t.shape_for(sizes))
            if shape != want or dtype != ARRAY_DTYPES[t.dtype]:
                problems.append(f"{kind} {t.name}: {dtype} {shape}, spec {ARRAY_DTYPES[t.dtype]} {want}")
            rows.append({"name": f.name, "shape": shape, "dtype": dtype})
        return rows

    out = {"inputs": check("input", pb.description.input, spec.inputs),
           "outputs": check("output", pb.description.output, spec.outputs),
           "specification_version": pb.specificationVersion, "opset": func.opset, "ops": op_precisions(block)}
    if problems:
        raise ExportError(f"{path.name}: Core ML package does not match the spec: " + "; ".join(problems))
    return out


def describe_ops(ops: dict) -> str:
    kept = ", ".join(f"{k} {v}" for k, v in ops["fp32_op_types"].items())
    return (f"{ops.get('fp16', 0)} fp16 / {ops.get('fp32', 0)} fp32 ops, {ops.get('cast', 0)} casts"
            + (f", {ops['weights']} compressed weights" if ops.get("weights") else "")
            + (f" (fp32: {kept})" if kept and ops.get("fp16") else ""))


def compress(ml, mode: str):
    """Data-free weight compression (works on Linux): int8 per-channel, or 4-bit k-means palettes."""
    from coremltools.optimize import coreml as cto

    with quiet():
        if mode == "int8":
            cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel"))
            return cto.linear_quantize_weights(ml, cfg)
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4))
        return cto.palettize_weights(ml, cfg)


def predict_check(ml, spec: GraphSpec, sizes: dict, precision: str, label: str, gating: bool) -> dict:
    """Run the package against torch: only possible on macOS."""
    if platform.system() != "Darwin":
        print(f"    -[skipped] Core ML prediction needs macOS ({label})")
        return {"skipped": "Core ML prediction needs macOS"}

    def run(feeds):
        out = ml.predict({t.name: feeds[t.name].astype(COREML_DTYPES[t.dtype]) for t in spec.inputs})
        return [out[n] for n in spec.output_names]

    v = validate(spec, run, [sizes], precision, label)
    if not v["pass"] and not gating:
        notice(f"{spec.name}: {label} misses the {precision} tolerance (recorded, not gating)")
    return v


def export_check(ep, spec: GraphSpec, sizes: dict) -> dict:
    """The exported torch program (what Core ML converts) must match torch eager."""
    import torch

    module = ep.module()

    def run(feeds):
        with torch.no_grad():
            out = module(*[torch.from_numpy(feeds[n]) for n in spec.input_names])
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

    return validate(spec, run, [sizes], "fp32", "torch.export program")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 conflict_handler="resolve")
    add_common_args(ap)
    ap.add_argument("--resolution", type=at_least(1), nargs="+", default=None,
                    help="export resolution(s) in pixels; the first is the bundle's, each further one adds "
                         "vae_*/model_<res>.mlpackage (default 512)")
    ap.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--quantize-weights", choices=["none", *COMPRESSIONS], default="none",
                    help="also write a weight-compressed package (int8 per-channel or 4-bit k-means palettes)")
    return ap.parse_args(argv)


def resolutions(args, ae) -> list[int]:
    """Checked, de-duplicated resolutions, the bundle's first."""
    out = []
    for r in args.resolution or [None]:
        r = resolve_resolution(argparse.Namespace(variant=args.variant, resolution=r), ae)
        if r not in out:
            out.append(r)
    return out


def bundle_is_dynamic(args, out: Path) -> bool:
    """Core ML packages are fixed-shape: without --static/--dynamic join the bundle already there."""
    if args.static or args.dynamic:
        return args.dynamic
    old = read_manifest(out) if out.is_dir() else None
    return old.get("dynamic", True) if old else True


def jobs(args, ae, dn, res_list: list[int], recipe: dict | None = None) -> list[tuple]:
    """(spec, res or None, package stem) per package: all graphs at the bundle resolution, the
    autoencoder graphs again at every further one."""
    first = [(s, None if s.name == "transformer" else res_list[0], "model")
             for s in build_specs(ae, dn, res_list[0], args.graphs, recipe)]
    vae = [g for g in (args.graphs or ["vae_encoder", "vae_decoder"]) if g != "transformer"]
    extra = [(s, r, f"model_{r}") for r in res_list[1:] if vae for s in build_specs(ae, None, r, vae)]
    return first + extra


def save_and_check(model, path: Path, key: str, spec: GraphSpec, sizes: dict, manifest: dict, stage: Path,
                   info: dict, tolerance: str, gating: bool) -> list[str]:
    """Save one package, check its spec, run it where possible, record it; returns failures."""
    save(model, path)
    checks = spec_checks(path, spec, sizes)
    mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    print(f"    -[✓] {path.name} ({mb:.2f} MB): names, shapes and dtypes match the spec; {describe_ops(checks['ops'])}")
    v = predict_check(model, spec, sizes, tolerance, key, gating)
    record_artifact(manifest, stage, spec.name, key, [path], {**info, "spec_checks": checks, "validation": v})
    return [f"{spec.name} {key}"] if gating and not v.get("pass", True) else []


def export_package(spec: GraphSpec, res: int | None, stem: str, args, stage: Path, manifest: dict,
                   ae_info: dict, dn_info: dict | None) -> list[str]:
    """Convert, save, check and record one package (+ its weight-compressed copy); returns failures."""
    gdir = stage / spec.name
    gdir.mkdir(exist_ok=True)
    sizes = export_sizes(spec, res or 0)  # the transformer's shape does not depend on the resolution
    suffix = f"@{res}" if stem != "model" else ""
    if "height" in sizes:  # a fixed-shape trace only serves its own attention branches
        spec.check_shape_supported(sizes["height"], sizes["width"])
    print(f"\n  [{spec.name}{' ' + str(res) + 'px' if res else ''}] converting ...", flush=True)
    ml, ep, info = convert_graph(spec, sizes, args.precision)
    print(f"    -[✓] torch.export ({info['export_seconds']} s) + ct.convert mlprogram iOS17 ({info['convert_seconds']} s)")
    check = export_check(ep, spec, sizes)
    failures = [] if check["pass"] else [f"{spec.name} torch.export"]
    info.update(precision=args.precision, resolution=res, fixed_shapes=True, minimum_deployment_target="iOS17",
                export_check=check)
    if "height" in sizes:
        info["attention_branches"] = spec.branch_pattern(sizes["height"], sizes["width"])
    if spec.name == "transformer":
        set_metadata(ml, spec, sizes, None, dn_info["latent_scaling_factor"], dn_info, args.precision)
    else:
        set_metadata(ml, spec, sizes, res, ae_info["scaling_factor"], ae_info, args.precision)
    graph_entry = manifest["graphs"].setdefault(spec.name, {"artifacts": {}})
    if stem == "model":  # graph-level shapes/branches describe the bundle's resolution; extra
        graph_entry.update(spec.to_manifest())  # resolutions keep theirs in the artifact info
    for stale in ("coreml/fp16", "coreml/fp32"):  # the other precision's entry pointed at the package just replaced
        manifest["graphs"][spec.name]["artifacts"].pop(stale + suffix, None)
    failures += save_and_check(ml, gdir / f"{stem}.mlpackage", f"coreml/{args.precision}{suffix}", spec, sizes,
                               manifest, stage, info, args.precision, gating=True)
    if args.quantize_weights != "none":
        tag = COMPRESSIONS[args.quantize_weights]
        t = time.perf_counter()
        small = compress(ml, args.quantize_weights)
        extra = {"base": f"coreml/{args.precision}{suffix}", "compression": args.quantize_weights,
                 "compress_seconds": round(time.perf_counter() - t, 1)}
        failures += save_and_check(small, gdir / f"{stem}_{tag}.mlpackage", f"coreml/{tag}{suffix}", spec, sizes,
                                   manifest, stage, {**info, **extra}, "fp16", gating=False)
    return failures


def main(argv=None):
    args = parse(argv)
    t0 = time.perf_counter()
    res_args = argparse.Namespace(**{**vars(args), "resolution": (args.resolution or [None])[0]})
    ae, ae_info, dn, dn_info = load_models(res_args)
    args.variant = res_args.variant
    out = default_out(args, ae_info)
    dynamic = bundle_is_dynamic(args, out)
    print(f"[export.coreml] {ae_info.get('release') or 'variant ' + args.variant} -> {out}")
    res_list = resolutions(args, ae)
    todo = jobs(args, ae, dn, res_list, (dn_info or {}).get("recipe"))
    print(f"  autoencoder {ae_info['name']} ({ae_info['source']}), fixed shapes at {', '.join(f'{r}px' for r in res_list)}, "
          f"{args.precision} compute, iOS17" + (f"; denoiser {dn_info['name']}" if dn_info else "; no denoiser"))
    with bundle_transaction(out) as stage:
        manifest = prepare_manifest(stage, args.variant, res_list[0], dynamic, ae_info, dn_info)
        manifest.setdefault("versions", {}).update(package_versions("coremltools", "torch", "numpy"))
        failures = []
        for spec, r, stem in todo:
            failures += export_package(spec, r, stem, args, stage, manifest, ae_info, dn_info)
        if failures:
            raise ValidationFailed(f"validation failed for {', '.join(failures)} (numbers above)")
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        write_manifest(manifest, stage)
    summarize(manifest, out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
