"""Phones: ONNX Runtime Mobile (ORT format) and ExecuTorch (.pte) artifacts for a bundle, each
validated against torch with the graph specs' tolerances, written atomically into the bundle.

    python -m export.mobile --bundle exports/f64                        # .ort (both styles) + .pte fp32/int8
    python -m export.mobile --bundle exports/f64 --formats ort --fixed-shapes

ORT format (onnxruntime's own converter, the version recorded: the runtime refuses another):
* every ONNX artifact of the bundle (fp32 / fp16 / int8) becomes ``<graph>/model[_p].ort``
  (optimization style Fixed, target arm: the CPU / XNNPACK path; artifact ``ort/<p>``) and
  ``<graph>/model[_p].with_runtime_opt.ort`` (style Runtime, for the NNAPI / Core ML execution
  providers; ``ort-runtime/<p>``); ``--fixed-shapes`` adds static copies (``ort/<p>@<res>``);
* ``mobile/required_operators_and_types.config`` (+ ``.with_runtime_opt``): the operators and
  types a reduced-size ORT build needs (the converter's absolute paths stripped);
* ``mobile/usability-<graph>.txt``: onnxruntime's check of which operators NNAPI / Core ML take.

ExecuTorch (the release that supports torch 2.13): ``<graph>/model.pte`` (XNNPACK delegate, ``pte/fp32``) and
``<graph>/model_int8.pte`` (XNNPACK quantizer, symmetric per-channel int8 convolutions and linear layers, traced
with RMSNorm's channel mean as a convolution XNNPACK takes,
calibrated on the photos / sampling trajectories calibration/ uses, ``pte/int8``, written only if
it passes the INT8 gates on held-out data); the operators left outside the delegate and the int8
operator count are recorded. Programs are fixed-shape: batch 1 at the bundle resolution (the
transformer: a CFG pair, batch 2); larger images go through tiles.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dcae_edge.compare import compare, describe, passes

from .bundle import BundleError, bundle_transaction, fresh, package_versions, read_manifest, record_artifact, write_manifest
from .common import ExportError, ValidationFailed, build_specs, notice, run_cli, summarize, validate, validation_sizes

# export.graph_forms for ExecuTorch: both programs take the denoiser's attention and LayerNorms in forms XNNPACK
# delegates (SDPA's safe-softmax chain, 4-D matmul expands, the q/k/v selects and native_layer_norm ran outside it).
# The fp32 program also cuts GLUMBConv's value and gate as two slices (the split ran outside XNNPACK; bundled f64
# decoder at 512²: 35 -> 31 delegates, 105.8 -> 96.9 ms on an AMX Xeon). Not the INT8 program: ExecuTorch 1.4
# aborted loading the INT8 encoder traced that way ("malloc(): unsorted double linked list corrupted" in
# load_method). The INT8 program instead
# takes RMSNorm's channel mean as a convolution XNNPACK delegates (without it a quantized output leaving the delegate
# there comes back in the wrong layout). Not the fp32 program, which works either way: its larger delegates peaked
# 61 MB higher (bundled f64 decoder at 512²: 553 vs 492 MB; INT8 543 both ways).
PTE_DENOISER_FORMS = ("softmax_attention", "layer_norm_by_means", "qkv_slices")
PTE_FORMS = PTE_DENOISER_FORMS + ("glu_slices",)
PTE_INT8_FORMS = PTE_DENOISER_FORMS + ("channel_mean_by_convolution",)

INT8_GATES = {"vae_encoder": {"min_cosine": 0.99}, "vae_decoder": {"min_psnr": 32.0}, "transformer": {"min_cosine": 0.99}}


# ---------------------------------------------------------------------------------------------- ORT format
def convert_ort(onnx_files: list[Path], out_dir: Path, style: str, out_name: str | None = None) -> dict[str, Path]:
    """Convert with onnxruntime's converter (in a scratch folder: it writes next to its inputs);
    returns {"model": .ort, "config": required operators (and types)}."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in onnx_files:
            shutil.copy2(f, tmp / f.name)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(tmp / onnx_files[0].name),
               "--optimization_style", style, "--target_platform", "arm", "--enable_type_reduction",
               "--output_dir", str(tmp / "out")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        outs = sorted((tmp / "out").glob("*.ort"))
        if r.returncode or not outs:
            raise ExportError(f"ORT conversion ({style}) of {onnx_files[0].name} failed: "
                              f"{(r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else '?'}")
        cfgs = sorted((tmp / "out").glob("*.config"))
        if out_name:
            outs[0] = outs[0].rename(outs[0].with_name(out_name))
        model = out_dir / outs[0].name
        shutil.copy2(outs[0], fresh(model))
        config = out_dir / f".{outs[0].stem}.config"
        shutil.copy2(cfgs[0], fresh(config)) if cfgs else None
        return {"model": model, "config": config if cfgs else None}


def merge_op_configs(paths: list[Path]) -> str:
    """One reduced-build config for every model: union of the (domain;opset;op{types}) lines, the
    converter's comment lines (absolute paths of this machine) dropped."""
    ops: dict[tuple[str, str], set[str]] = {}
    for p in paths:
        for line in p.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            domain, opset, rest = line.split(";", 2)
            for op in re.findall(r"([A-Za-z0-9_]+(?:\{[^}]*\})?)(?:,|$)", rest):
                ops.setdefault((domain, opset), set()).add(op)
    lines = ["# operators (and types) the bundle's ORT-format models need, for a reduced-size build:",
             "#   ./build.sh --minimal_build --include_ops_by_config <this file> --enable_reduced_operator_type_support"]
    for (domain, opset), names in sorted(ops.items()):
        lines.append(f"{domain};{opset};{','.join(sorted(names))}")
    return "\n".join(lines) + "\n"


def int8_ops(config: Path | None) -> dict[str, int]:
    """Operators of one model that compute on 8-bit integers (from its type-reduced config)."""
    if config is None:
        return {}
    found: dict[str, int] = {}
    for line in config.read_text().splitlines():
        if line.startswith("#") or ";" not in line:
            continue
        for op, types in re.findall(r"([A-Za-z0-9_]+)(\{[^}]*\})?", line.split(";", 2)[2]):
            if types and ("int8" in types):
                found[op] = found.get(op, 0) + 1
    return found


def usability_report(onnx_path: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(onnx_path)],
                       capture_output=True, text=True)
    text = (r.stdout + r.stderr).replace(str(onnx_path.parent), "<graph>")
    return re.sub(r"/[^\s]*/", "", text) if r.returncode == 0 else f"check failed: {text.strip()[-500:]}"


# ---------------------------------------------------------------------------------------------- ExecuTorch
def import_executorch():
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise ExportError("ExecuTorch is not installed: pip install 'dcae-edge[mobile]' (or --formats ort)") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def lower_to_pte(module, args: tuple, path: Path) -> dict:
    """torch.export at fixed shapes -> edge -> XNNPACK delegate -> .pte; what stayed outside."""
    import torch

    to_edge, Partitioner = import_executorch()
    t = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(module, args)
        edge = to_edge(ep, partitioner=[Partitioner()])
    outside = {}
    delegates = 0
    for node in edge.exported_program().graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "call_delegate" in name:
            delegates += 1
        elif name != "getitem":
            outside[name] = outside.get(name, 0) + 1
    prog = edge.to_executorch()
    fresh(path).write_bytes(prog.buffer)
    return {"seconds": round(time.perf_counter() - t, 1), "delegates": delegates, "ops_outside_delegate": outside,
            "fixed_shapes": True, "batch": int(args[0].shape[0])}


def quantize_module(module, args: tuple, calib: list[tuple]) -> tuple:
    """XNNPACK quantizer: symmetric int8, per-channel weights, static activations from ``calib``,
    on the convolutions and linear layers (where the work and the weight bytes are), by operator: a
    module-type filter (``set_module_type(nn.Conv2d)``) silently skips every convolution, because it also
    tests the weight and bias nodes, which carry no module stack (only the linear layers were quantized, and
    the int8 decoder program was 7% smaller than fp32). Quantizing every op (adds, matmuls of the linear
    attention) builds programs the XNNPACK runtime refuses (NotSupported). Run inside ExecuTorch's graph forms
    (PTE_INT8_FORMS): a quantized convolution whose output leaves the delegate for RMSNorm's channel mean came back in
    the wrong layout."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer, _get_module_type_filter,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from dcae_edge.autoencoder import RMSNorm2d

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = (XNNPACKQuantizer().set_operator_type(torch.ops.aten.conv2d.default, config)
                 .set_operator_type(torch.ops.aten.linear.default, config))
    in_norm = _get_module_type_filter(RMSNorm2d)  # the channel mean's convolution (of squares) stays float
    quantizer.set_filter_function(lambda node: not in_norm(node))
    with torch.no_grad():
        m = torch.export.export(module, args).module()
        m = prepare_pt2e(m, quantizer)
        for feeds in calib:
            m(*feeds)
        m = convert_pt2e(m)
    int8 = sum(1 for n in m.graph.nodes if n.op == "call_function" and "quantize_per" in str(n.target))
    weights = sum(1 for n in m.graph.nodes if n.op == "call_function" and "dequantize_per_channel" in str(n.target))
    return m, {"int8_quantize_ops": int8, "int8_weight_tensors": weights, "calibration_feeds": len(calib)}


class PteRunner:
    def __init__(self, path: Path, input_names: list[str]):
        from runtimes.backends import ExecuTorchGraph

        self.graph = ExecuTorchGraph(path, input_names, ["out"])

    def __call__(self, feeds):
        return self.graph.run(feeds)


# ---------------------------------------------------------------------------------------------- data
def calibration_feeds(spec, manifest: dict, count: int, held_out: bool, seed: int = 0) -> list[dict]:
    """Real inputs at the programs' fixed shapes: photo crops (held-out: the evaluation photos), their
    latents, or inputs recorded along the model's own sampling trajectories."""
    import torch

    from calibration.data import load_photos

    res = int(manifest["resolution"])
    if spec.name == "transformer":
        rows: list[dict] = []
        trial = 0
        while len(rows) < count:
            rows += [spec.example_inputs({"batch": 2})] if trial == 0 else _trajectory(spec, manifest, seed + trial + 1000 * held_out)
            trial += 1
        return rows[:count]
    photos, _ = load_photos(None, res, count, seed, held_out)
    if spec.name == "vae_encoder":
        return [{"sample": photos[i:i + 1]} for i in range(len(photos))]
    enc = spec.meta["encoder"]
    with torch.no_grad():
        return [{"latent_sample": enc(torch.from_numpy(photos[i:i + 1])).numpy()} for i in range(len(photos))]


def _trajectory(spec, manifest: dict, seed: int) -> list[dict]:
    import torch

    from dcae_edge.sample import generate_latents

    dn = spec.meta["denoiser"]
    record: list = []
    cfg = dn.config
    classes = [(seed * 3 + i) % cfg.num_classes for i in range(1)] if cfg.conditional else None
    recipe = manifest.get("sampler")
    scale = float(recipe.get("cfg_scale", 1.0)) if cfg.conditional else 1.0
    with torch.no_grad():
        generate_latents(dn, classes, min(10, int(recipe.get("steps", 10))), scale if scale != 1 else (2.0 if cfg.conditional else 1.0),
                         seed=seed, n=None if classes else 2, record=record, recipe=recipe if recipe["solver"]["name"] != "dopri5"
                         else {**recipe, "solver": {"name": "heun"}})
    return [{"hidden_states": h.numpy(), "timestep": t.numpy(), "class_labels": (y if y is not None else
             torch.zeros(len(h), dtype=torch.long)).numpy()} for h, t, y in record]


# ---------------------------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--weights", default=None, help="autoencoder checkpoint or released folder the bundle came from "
                                                    "(bundled weights are found by name)")
    ap.add_argument("--denoiser", default=None, help="denoiser checkpoint the bundle came from")
    ap.add_argument("--formats", nargs="+", default=["ort", "pte"], choices=["ort", "pte"])
    ap.add_argument("--graphs", nargs="+", default=None)
    ap.add_argument("--fixed-shapes", action="store_true", help="also static ORT copies at the bundle resolution")
    ap.add_argument("--no-pte-int8", action="store_true")
    ap.add_argument("--num-calibration", type=int, default=16)
    ap.add_argument("--num-eval", type=int, default=8)
    return ap.parse_args(argv)


def main(argv=None):
    import onnx
    import torch

    from .golden import _weights_of

    args = parse(argv)
    bundle = args.bundle
    manifest = read_manifest(bundle)
    if manifest is None:
        raise ExportError(f"{bundle} has no manifest.json: export the bundle first (python -m export.onnx)")
    graphs = [g for g in (args.graphs or list(manifest["graphs"])) if g in manifest["graphs"]]
    missing = [g for g in (args.graphs or []) if g not in manifest["graphs"]]
    if missing:
        raise ExportError(f"{bundle} has no {', '.join(missing)} graph (it holds {', '.join(manifest['graphs'])})")
    if "pte" in args.formats:
        import_executorch()
    res = int(manifest["resolution"])
    ae = _weights_of(manifest, "autoencoder", args.weights) if set(graphs) & {"vae_encoder", "vae_decoder"} else None
    dn = _weights_of(manifest, "denoiser", args.weights if (manifest.get("denoiser") or {}).get("release") else args.denoiser) \
        if "transformer" in graphs and manifest.get("denoiser") else None
    if ae is None and dn is not None:
        ae = _weights_of(manifest, "autoencoder", args.weights)
    specs = build_specs(ae, dn, res, graphs, manifest.get("sampler"))
    for spec in specs:
        spec.meta.update(encoder=ae.encoder.eval() if ae is not None else None, denoiser=dn)
    t0 = time.perf_counter()
    print(f"[export.mobile] {bundle}: {', '.join(args.formats)} for {', '.join(graphs)}")
    with bundle_transaction(bundle) as stage:
        m = read_manifest(stage)
        m.setdefault("versions", {}).update(package_versions("onnxruntime", "executorch", "torch", "torchao"))
        failures, configs = [], {"Fixed": [], "Runtime": []}
        (stage / "mobile").mkdir(exist_ok=True)
        import onnxruntime

        for spec in specs:
            gdir = stage / spec.name
            arts = m["graphs"][spec.name]["artifacts"]
            sizes = [s for s in validation_sizes(spec, res, m.get("dynamic", True))]
            if "ort" in args.formats:
                for key in [k for k in sorted(arts) if k.startswith("onnx/")]:
                    precision = key.split("/")[1]
                    src = [stage / f for f in arts[key]["files"]]
                    for style, prefix in (("Fixed", "ort"), ("Runtime", "ort-runtime")):
                        print(f"\n  [{spec.name}] {key} -> ORT format ({style}) ...", flush=True)
                        out = convert_ort(src, gdir, style)
                        if out["config"]:
                            configs[style].append(out["config"])
                        info = {"style": style, "target_platform": "arm", "source": key, "precision": precision,
                                "onnxruntime_version": onnxruntime.__version__, "int8_ops": int8_ops(out["config"])}
                        from export.onnx import ort_runner

                        runner = ort_runner(out["model"])
                        info["validation"] = check(spec, runner, sizes, precision, f"ORT format {style} {precision}")
                        record_artifact(m, stage, spec.name, f"{prefix}/{precision}", [out["model"]], info)
                        if not info["validation"]["pass"]:
                            failures.append(f"{spec.name} {prefix}/{precision}")
                    if args.fixed_shapes and precision == "fp32":
                        failures += fixed_shape_copy(spec, src[0], gdir, stage, m, sizes)
                (stage / "mobile" / f"usability-{spec.name}.txt").write_text(usability_report(src[0]) if "onnx/fp32" in arts else "")
            if "pte" in args.formats:
                failures += export_pte(spec, gdir, stage, m, args)
        for style, suffix in (("Fixed", ""), ("Runtime", ".with_runtime_opt")):
            if configs[style]:
                p = stage / "mobile" / f"required_operators_and_types{suffix}.config"
                fresh(p).write_text(merge_op_configs(configs[style]))
                for c in configs[style]:
                    c.unlink()
        mobile_files = sorted(p for p in (stage / "mobile").iterdir() if p.is_file())
        for p in mobile_files:
            from .bundle import sha256_file

            m["files"][p.relative_to(stage).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        m["mobile"] = {"onnxruntime_version": onnxruntime.__version__, "files": [p.relative_to(stage).as_posix() for p in mobile_files]}
        if failures:
            raise ValidationFailed(f"validation failed for {', '.join(failures)} (numbers above)")
        m["mobile_export_seconds"] = round(time.perf_counter() - t0, 1)
        write_manifest(m, stage)
    summarize(m, bundle)


def check(spec, runner, sizes: list[dict], precision: str, label: str) -> dict:
    if precision in ("fp32", "fp16"):
        return validate(spec, runner, sizes, precision, label)
    gate = INT8_GATES[spec.name]
    return validate_gate(spec, runner, [spec.examples(s) for s in sizes], gate, label)


def validate_gate(spec, runner, feed_list: list[dict], gate: dict, label: str) -> dict:
    from .common import torch_reference

    refs, outs = [], []
    for feeds in feed_list:  # flattened: inputs may differ in size
        refs.append(torch_reference(spec, feeds)[0].ravel())
        outs.append(np.asarray(runner(feeds)[0]).ravel())
    ref, out = np.concatenate(refs), np.concatenate(outs)
    if spec.name == "vae_decoder":  # images as shown
        ref, out = np.clip(ref, -1, 1), np.clip(out, -1, 1)
    m = compare(ref, out)
    ok = passes(m, gate)
    print(f"    -[{'✓' if ok else '✗'}] {label} ({len(feed_list)} feeds): {describe(m)}  (gate {gate})", flush=True)
    return {"pass": bool(ok), "precision": "int8", "tolerance": gate, "inputs": f"{len(feed_list)} real inputs",
            "results": [{k: v for k, v in m.items() if k != "ref_max_abs"}]}


def fixed_shape_copy(spec, onnx_path: Path, gdir: Path, stage: Path, m: dict, sizes: list[dict]) -> list[str]:
    """A static copy (batch 1 or the CFG pair, the bundle resolution) for providers that need one."""
    import onnx

    res = int(m["resolution"])
    fixed = {"batch": 2 if spec.name == "transformer" else 1}
    if spec.name != "transformer":
        unit = res // spec.spatial_scale
        fixed.update(height=unit, width=unit)
    model = onnx.load(str(onnx_path))
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                try:
                    d.dim_value = int(eval(d.dim_param, {}, dict(fixed)))  # noqa: S307 - the spec's own axis expressions
                except Exception:  # noqa: BLE001
                    continue
    tmp = gdir / f".static-{res}.onnx"
    onnx.save(model, str(fresh(tmp)))
    out = convert_ort([tmp], gdir, "Fixed")
    target = gdir / f"model_{res}.ort"
    out["model"].replace(fresh(target))
    tmp.unlink()
    if out["config"]:
        out["config"].unlink()
    from export.onnx import ort_runner

    v = validate(spec, ort_runner(target), [{**fixed}], "fp32", f"ORT format static {res}px")
    record_artifact(m, stage, spec.name, f"ort/fp32@{res}", [target], {"style": "Fixed", "fixed_shapes": True,
                    "resolution": res, "batch": fixed["batch"], "validation": v,
                    "onnxruntime_version": __import__("onnxruntime").__version__})
    return [] if v["pass"] else [f"{spec.name} ort/fp32@{res}"]


def export_pte(spec, gdir: Path, stage: Path, m: dict, args) -> list[str]:
    import torch

    from .graph_forms import forms_in, graph_forms

    res = int(m["resolution"])
    sizes = {"batch": 2} if spec.name == "transformer" else {"batch": 1, "height": res // spec.spatial_scale,
                                                               "width": res // spec.spatial_scale}
    feeds = spec.examples(sizes)
    ex_args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    print(f"\n  [{spec.name}] ExecuTorch XNNPACK fp32 ...", flush=True)
    path = gdir / "model.pte"
    with graph_forms(spec.module, PTE_FORMS):  # traced in these forms; validated against the model's own
        info = lower_to_pte(spec.module, ex_args, path)
    info["graph_forms"] = forms_in(spec.module, PTE_FORMS)
    runner = PteRunner(path, spec.input_names)
    info["validation"] = validate(spec, runner, [sizes], "fp32", "ExecuTorch fp32")
    if info["ops_outside_delegate"]:
        notice(f"{spec.name}: operators outside the XNNPACK delegate: {info['ops_outside_delegate']}")
    info.update(precision="fp32", executorch_version=package_versions("executorch").get("executorch"))
    record_artifact(m, stage, spec.name, "pte/fp32", [path], info)
    failures = [] if info["validation"]["pass"] else [f"{spec.name} pte/fp32"]
    if args.no_pte_int8:
        return failures
    print(f"  [{spec.name}] ExecuTorch XNNPACK int8 (calibrating on {args.num_calibration} real inputs) ...", flush=True)
    calib = calibration_feeds(spec, m, args.num_calibration, held_out=False)
    with graph_forms(spec.module, PTE_INT8_FORMS):
        qmod, qinfo = quantize_module(spec.module, ex_args,
                                      [tuple(torch.from_numpy(f[n]) for n in spec.input_names) for f in calib])
    qpath = gdir / "model_int8.pte"
    info8 = lower_to_pte(qmod, ex_args, qpath)
    info8.update(qinfo, graph_forms=forms_in(spec.module, PTE_INT8_FORMS))
    held = calibration_feeds(spec, m, args.num_eval, held_out=True, seed=99)
    info8["validation"] = validate_gate(spec, PteRunner(qpath, spec.input_names), held, INT8_GATES[spec.name],
                                        "ExecuTorch int8 (held-out)")
    info8.update(precision="int8", quantizer="XNNPACKQuantizer symmetric per-channel, static activations",
                 executorch_version=info["executorch_version"])
    if info8["validation"]["pass"]:
        record_artifact(m, stage, spec.name, "pte/int8", [qpath], info8)
        return failures
    qpath.unlink()
    notice(f"{spec.name}: the int8 program misses its gate on held-out data: not written")
    return failures


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
