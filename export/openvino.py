"""Export DC-AE encoder/decoder (and the denoiser) to OpenVINO IR, validated on real photos.

    python -m export.openvino --variant f64                   # bundled weights -> exports/f64/
    python -m export.openvino --variant f64 --fp16-weights    # half-size .bin; compute stays f32/bf16

Writes DIR/{vae_encoder,vae_decoder,transformer}/openvino_model.xml/.bin (optimum-intel layout)
into the same bundle as export.onnx: same weights and shapes keep the ONNX artifacts already there.
Graphs come from the shared GraphSpecs (names, axes, tolerances are never re-declared here):
``ov.convert_model`` traces the torch wrapper, inputs get the spec's names, types and shapes
(-1 for the spec's symbolic axes unless --static), outputs the spec's names. Graphs with more than
``--lean-above`` MB of weights (default 1 GB) convert through a temporary ONNX file of the same spec
(dynamo, external data) once their torch references are computed and their weights freed: tracing
inside ov.convert_model holds about two extra copies of the weights.

Validation reads the saved IR back and runs it on the CPU plugin twice:

* ``INFERENCE_PRECISION_HINT=f32`` must meet the fp32 tolerance (as ONNX), or the export fails
  (--fp16-weights: the fp16 tolerance, PSNR >= 40 dB, since rounding the weights alone costs ~1e-3);
* the CPU's *default* execution is measured too. On AMX/avx512_bf16 CPUs that default is bf16
  (about 1% error, 2x faster); it is recorded with the bf16 tolerance (PSNR >= 35 dB) but never
  fails the export, because apps choose the hint, and other CPUs run f32 anyway.

DC-AE graphs carry optimum-intel's fp16-overflow guard in the IR's rt_info,
``runtime_options/ACTIVATIONS_SCALE_FACTOR = 8.0``: GPU/NPU plugins running f16 scale activations
down by it; the CPU plugin ignores it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dcae_edge.cli import non_negative
from dcae_edge.timing import time_calls

from .bundle import bundle_transaction, package_versions, record_artifact, write_manifest
from .common import (LEAN_ABOVE_MB, ExportError, ValidationFailed, add_common_args, build_specs, default_out, export_sizes,
                     exports_lean, load_models, notice, prepare_manifest, release_unused_encoder, release_weights,
                     resolve_resolution, run_cli, summarize, validate, validation_sizes)
if TYPE_CHECKING:
    from .specs import GraphSpec

# optimum-intel writes this for Sana's DC-AE encoder and decoder (PR #994, #1110)
RUNTIME_OPTIONS = {"vae_encoder": {"ACTIVATIONS_SCALE_FACTOR": "8.0"}, "vae_decoder": {"ACTIVATIONS_SCALE_FACTOR": "8.0"}}
ARTIFACT_KEYS = ("openvino/fp32", "openvino/fp16w")  # both live in openvino_model.xml/.bin
# export.graph_forms: the projections as 1x1 convs, GLUMBConv's halves from weight slices, the shortcuts as
# constant-weight convolutions, pixel_unshuffle(conv3x3) as one strided conv, the block shortcuts inside their
# convolutions' weights (fewer layout reorders in the CPU plugin; the same values up to rounding, validated
# against the model's own forms below), and the decoder's output norm where OpenVINO fuses it (f32 inside under bf16)
GRAPH_FORMS = ("pointwise_projections", "glu_halves", "shortcut_convolutions", "strided_downsample", "shortcuts_in_weights",
               "fused_output_norm")


def frontend_extensions() -> list:
    """PyTorch-frontend conversions: pixel_shuffle / pixel_unshuffle as one DepthToSpace / SpaceToDepth
    ("depth_first" is torch's channel order) instead of the frontend's Reshape-Transpose-Reshape, which
    the CPU plugin runs in its generic Transpose with layout reorders around it. Interleaved medians,
    AMD EPYC (AVX-512 bf16/VNNI), 2 threads, bundled f64 at 512²: encoder bf16 41.3 -> 27.7 ms,
    INT8+bf16 39.1 -> 24.3 ms; decoder bf16 35.5 -> 32.3 ms, INT8+bf16 29.8 -> 27.0 ms. (The ONNX path,
    for weights over --lean-above, reads export.onnx's DepthToSpace and SpaceToDepth + regrouping.)"""
    import openvino.opset13 as ops
    from openvino.frontend import ConversionExtension

    def blocks(op):
        return lambda node: op(node.get_input(0), "depth_first", int(node.get_values_from_const_input(1))).outputs()

    return [ConversionExtension("aten::pixel_shuffle", blocks(ops.depth_to_space)),
            ConversionExtension("aten::pixel_unshuffle", blocks(ops.space_to_depth))]


def expected_shape(t, sizes: dict, dynamic: bool) -> list[int]:
    """The spec's shape at ``sizes``, with -1 for its symbolic axes when the graph is dynamic."""
    return [-1 if dynamic and isinstance(d, str) else s for d, s in zip(t.dims, t.shape_for(sizes))]


def convert_graph(spec: GraphSpec, sizes: dict, dynamic: bool, onnx_file: Path | None = None):
    """Trace the torch wrapper (or read ``onnx_file``, the same spec exported by export.onnx); inputs
    take the spec's names, types and shapes, outputs its names."""
    import openvino as ov
    import torch

    from .graph_forms import graph_forms

    inputs = [(t.name, ov.PartialShape(expected_shape(t, sizes, dynamic)), ov.Type(np.dtype(t.dtype))) for t in spec.inputs]
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # torch.jit.trace deprecation, tracer warnings on the attention branch
            if onnx_file is not None:
                model = ov.convert_model(str(onnx_file), input=inputs)
            else:
                feeds = spec.trace_inputs(sizes)
                args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
                with graph_forms(spec.module, GRAPH_FORMS):
                    model = ov.convert_model(spec.module, example_input=args, input=inputs, extension=frontend_extensions())
    except Exception as e:  # noqa: BLE001 - report the converter's first line, not its traceback
        raise ExportError(f"{spec.name}: ov.convert_model failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    # exact names: tracing can attach internal names (e.g. 't', '56') to an input tensor
    for port, t in zip(list(model.inputs) + list(model.outputs), spec.inputs + spec.outputs):
        port.get_tensor().set_names({t.name})
    for key, value in RUNTIME_OPTIONS.get(spec.name, {}).items():
        model.set_rt_info(value, ["runtime_options", key])
    return model, {"seconds": round(time.perf_counter() - t0, 1), "ops": len(model.get_ops())}


def onnx_for_conversion(spec: GraphSpec, folder: Path, sizes: dict, dynamic: bool) -> Path:
    """Large graphs: the spec exported to ONNX by dynamo, weights streamed to one external-data file.
    Tracing the torch module inside ov.convert_model holds about two more copies of the weights
    (5.3 GiB peak for the 1.65 GB paper decoder); OpenVINO's ONNX reader needs one, and the torch
    weights can go before it runs."""
    from .graph_forms import graph_forms
    from .onnx import export_graph

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with graph_forms(spec.module, GRAPH_FORMS):
        info = export_graph(spec, path, sizes, dynamic, opset=18, exporter="dynamo", lean_above_mb=0)
    print(f"    -[✓] through ONNX: dynamo, external data ({info['nodes_exported']} nodes, {info['seconds']} s)", flush=True)
    return path


def check_signature(model, spec: GraphSpec, sizes: dict, dynamic: bool) -> None:
    """Names, types and shapes of the (saved) IR against the spec; the first mismatch is an error."""
    import openvino as ov

    problems = []
    if len(model.inputs) != len(spec.inputs) or len(model.outputs) != len(spec.outputs):
        problems.append(f"{len(model.inputs)} inputs / {len(model.outputs)} outputs, spec has "
                        f"{len(spec.inputs)} / {len(spec.outputs)}")
    for kind, ports, tensors in (("input", model.inputs, spec.inputs), ("output", model.outputs, spec.outputs)):
        for port, t in zip(ports, tensors):
            want = ov.PartialShape(expected_shape(t, sizes, dynamic))
            got = port.get_partial_shape()
            if port.get_names() != {t.name}:
                problems.append(f"{kind} {t.name!r} is named {sorted(port.get_names())}")
            if port.get_element_type() != ov.Type(np.dtype(t.dtype)):
                problems.append(f"{kind} {t.name!r} has type {port.get_element_type()}, spec {t.dtype}")
            # inputs must match exactly; outputs may stay less specified than the spec when dynamic
            if (got != want) if (kind == "input" or not dynamic) else not got.compatible(want):
                problems.append(f"{kind} {t.name!r} has shape {got}, spec {want}")
    if problems:
        raise ExportError(f"{spec.name}: OpenVINO IR does not match the spec: " + "; ".join(problems))


def read_runtime_options(model, graph: str) -> dict:
    return {k: model.get_rt_info(["runtime_options", k]).astype(str) for k in RUNTIME_OPTIONS.get(graph, {})
            if model.has_rt_info(["runtime_options", k])}


def save(model, gdir: Path, fp16_weights: bool) -> list[Path]:
    import openvino as ov

    xml = gdir / "openvino_model.xml"
    files = [xml, xml.with_suffix(".bin")]
    for f in files:  # the staging copy hard-links the live bundle: replace files, never rewrite them in place
        f.unlink(missing_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=fp16_weights)
    return files


def ov_runner(core, model, spec: GraphSpec, hint: str):
    """(run_fn, precision the CPU plugin really executes) for one INFERENCE_PRECISION_HINT."""
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()

    def run(feeds):
        request.infer(feeds)
        return [request.get_tensor(n).data.copy() for n in spec.output_names]

    return run, str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def profile_nodes(core, model, feeds: dict, hint: str, runs: int = 5, config: dict | None = None) -> dict[tuple[str, str, str], float]:
    """Median ms per executed node over ``runs`` runs, keyed (node name, node type, kernel), from the CPU
    plugin's performance counters at one INFERENCE_PRECISION_HINT (``model``: an ov.Model or an IR path).
    Medians per node: a neighbour's burst on a shared machine then moves a node's time less than a mean."""
    return profile_together(core, [model], feeds, hint, runs, config)[0]


def profile_together(core, models: list, feeds: dict, hint: str, runs: int = 5,
                     config: dict | None = None) -> list[dict[tuple[str, str, str], float]]:
    """profile_nodes for several models, their runs taking turns: two graphs compared node by node (INT8 vs
    float) then share the machine's slow and quiet spells instead of each getting its own. Compiled for the
    feeds' shapes, as runtimes.backends.OpenVinoGraph runs them."""
    from runtimes.backends import compile_for

    config = {**(config or {}), "INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": True}
    requests = [compile_for(core, m, feeds, config).create_infer_request() for m in models]
    for request in requests:
        for _ in range(2):
            request.infer(feeds)
    times: list[dict[tuple[str, str, str], list[float]]] = [{} for _ in models]
    for _ in range(runs):
        for request, per_node in zip(requests, times):
            request.infer(feeds)
            for info in request.get_profiling_info():
                per_node.setdefault((info.node_name, info.node_type, info.exec_type), []).append(info.real_time.total_seconds() * 1000)
    return [{k: statistics.median(v) for k, v in per_node.items()} for per_node in times]


def median_ms(run, feeds: dict, repeats: int = 5) -> float:
    return round(statistics.median(time_calls(lambda: run(feeds), repeats)), 1)


def validate_precisions(core, model, spec: GraphSpec, sizes_list: list[dict], fp16_weights: bool) -> tuple[dict, dict, dict]:
    """f32 validation (gating), bf16 validation (recorded only) and their median latency at the export size.
    fp16 weights alone cost ~1e-3 relative error: that artifact is held to the fp16 tolerance."""
    feeds = spec.examples(sizes_list[0])
    run, _ = ov_runner(core, model, spec, "f32")
    v = validate(spec, run, sizes_list, "fp16" if fp16_weights else "fp32",
                 "openvino f32, fp16 weights" if fp16_weights else "openvino f32")
    latency = {"f32": median_ms(run, feeds)}
    del run  # one compiled model at a time: at paper size each holds its own copy of the weights
    try:
        run, executed = ov_runner(core, model, spec, "bf16")
        if executed != "bf16":
            vb = {"skipped": f"this CPU has no bf16: the plugin runs {executed}"}
            print(f"    -[skipped] openvino bf16: {vb['skipped']}")
        else:
            vb = validate(spec, run, sizes_list, "bf16", "openvino bf16")
            latency["bf16"] = median_ms(run, feeds)
            if not vb["pass"]:
                notice(f"{spec.name}: the CPU's default bf16 execution misses its tolerance; apps must compile it "
                       "with INFERENCE_PRECISION_HINT=f32 (the f32 artifact itself is valid)")
    except Exception as e:  # noqa: BLE001 - bf16 is informative only
        vb = {"pass": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        print(f"    -[✗] openvino bf16: {vb['error']}")
    print("    -[✓] median latency at the export shape: " + ", ".join(f"{k} {ms} ms" for k, ms in latency.items()))
    return v, vb, latency


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--fp16-weights", action="store_true",
                    help="store weights as fp16 (half the .bin; the CPU still computes in f32/bf16)")
    ap.add_argument("--lean-above", type=non_negative, default=LEAN_ABOVE_MB, metavar="MB",
                    help="graphs with more weights (default: %(default)s MB) convert through a temporary ONNX file "
                         "(dynamo, external data) after their torch references are computed and their torch weights "
                         "freed: a fraction of the memory of tracing inside ov.convert_model")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)  # before the import: --help works without openvino
    import openvino as ov

    from .graph_forms import forms_in


    dynamic = not args.static
    key = "openvino/fp16w" if args.fp16_weights else "openvino/fp32"
    t0 = time.perf_counter()
    ae, ae_info, dn, dn_info = load_models(args)
    out = default_out(args, ae_info)
    print(f"[export.openvino] {ae_info.get('release') or 'variant ' + args.variant} -> {out}")
    res = resolve_resolution(args, ae)
    specs = build_specs(ae, dn, res, args.graphs, (dn_info or {}).get("recipe"))
    if release_unused_encoder(ae, specs, res, dynamic, trace_sizes=next(
            (export_sizes(s, res) for s in specs if s.name == "vae_decoder"), None)):
        print("  decoder only: photo latents computed up front, encoder weights released")
    print(f"  autoencoder {ae_info['name']} ({ae_info['source']}), {'dynamic' if dynamic else 'static'} shapes, {res}px, "
          f"{'fp16' if args.fp16_weights else 'fp32'} weights"
          + (f"; denoiser {dn_info['name']}" if dn_info else "; no denoiser"))
    core = ov.Core()
    with bundle_transaction(out) as stage:
        manifest = prepare_manifest(stage, args.variant, res, dynamic, ae_info, dn_info)
        manifest.setdefault("versions", {}).update(package_versions("openvino", "torch", "numpy"))
        failures = []
        for spec in specs:
            gdir = stage / spec.name
            gdir.mkdir(exist_ok=True)
            sizes = export_sizes(spec, res)
            vsizes = validation_sizes(spec, res, dynamic)
            lean = exports_lean(spec, args.lean_above)
            forms = forms_in(spec.module, GRAPH_FORMS)  # before a lean export releases the torch weights
            if lean:  # torch outputs first, so the torch weights can go before OpenVINO reads its own copy
                for vs in vsizes:
                    spec.reference(vs)
            print(f"\n  [{spec.name}] converting ...", flush=True)
            via = gdir / ".onnx-for-conversion"
            onnx_file = onnx_for_conversion(spec, via, sizes, dynamic) if lean else None
            if lean and release_weights(spec, specs):
                print("    torch weights released before conversion (references computed up front)")
            model, info = convert_graph(spec, sizes, dynamic, onnx_file)
            info["converted_from"] = "onnx (dynamo, external data)" if lean else "torch (traced)"
            info["graph_forms"] = forms
            print(f"    -[✓] ov.convert_model ({info['ops']} ops, {info['seconds']} s)")
            files = save(model, gdir, args.fp16_weights)
            del model
            shutil.rmtree(via, ignore_errors=True)
            saved = core.read_model(str(files[0]))
            check_signature(saved, spec, sizes, dynamic)
            info["runtime_options"] = read_runtime_options(saved, spec.name)
            if info["runtime_options"] != RUNTIME_OPTIONS.get(spec.name, {}):
                raise ExportError(f"{spec.name}: rt_info runtime_options {info['runtime_options']} did not survive saving")
            mb = sum(f.stat().st_size for f in files) / 1e6
            print(f"    -[✓] saved {files[0].name}/.bin ({mb:.2f} MB); names, types and shapes match the spec"
                  + (f"; rt_info runtime_options {info['runtime_options']}" if info["runtime_options"] else ""))
            v, vb, latency = validate_precisions(core, saved, spec, vsizes, args.fp16_weights)
            info.update(precision="f32", weights="fp16" if args.fp16_weights else "fp32", validation=v,
                        validation_bf16=vb, latency_ms=latency, device="CPU")
            manifest["graphs"].setdefault(spec.name, {"artifacts": {}}).update(spec.to_manifest())
            for stale in ARTIFACT_KEYS:  # the other weight format's entry pointed at the files just replaced
                manifest["graphs"][spec.name]["artifacts"].pop(stale, None)
            record_artifact(manifest, stage, spec.name, key, files, info)
            if not v["pass"]:
                failures.append(f"{spec.name} f32")
        if failures:
            raise ValidationFailed(f"validation failed for {', '.join(failures)} (numbers above)")
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        write_manifest(manifest, stage)
    summarize(manifest, out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
