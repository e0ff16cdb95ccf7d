"""Export DC-AE encoder/decoder (and the denoiser) to ONNX, validated on real photos.

    python -m export.onnx --variant f64                       # bundled weights -> exports/f64/
    python -m export.onnx --variant f64 --weights path/to/dc-ae-f64c128-in-1.0-diffusers --out exports/f64-paper

Writes DIR/{vae_encoder,vae_decoder,transformer}/model.onnx (+ model_fp16.onnx with --fp16) and
DIR/manifest.json. Every graph is checked with onnx.checker and run in onnxruntime (CPU) on real
photos / their latents / sampling-trajectory inputs at the export shape and, for dynamic graphs,
at an unseen batch and resolution; outputs must be finite and within tolerance of torch (fp32:
max abs <= 1e-4 on images). On any failure the command exits non-zero and leaves the previous
bundle untouched.

Exporter: TorchScript (default: on the edge f64 encoder the whole command takes 7.5 s instead of
26.5 s with dynamo, whose torch.export tracing alone is ~17 s; onnxslim then leaves 397 nodes
instead of 445; parity is the same) or torch's dynamo exporter (``--exporter dynamo``, opset >= 18).
Large graphs (weights over ``--external-data-above``, default 1 GB; always over 2 GB) use dynamo,
which streams the weights into one external-data file instead of building a protobuf copy of them:
the TorchScript exporter peaked at 13.3 GiB on the 1.65 GB paper-size decoder. They skip the graph
simplifier (it would load every weight; ONNX Runtime and OpenVINO fold the same constants at load)
and validate after the torch weights are released (said, never silent).
DC-AE's linear attention is written with clamp_min(eps), which the dynamo optimizer cannot fold
(it deletes ``x + 1e-15`` and real photos then give NaN).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dcae_edge.cli import non_negative

from .bundle import bundle_transaction, fresh, package_versions, record_artifact, write_manifest
from .common import (LEAN_ABOVE_MB, ExportError, ValidationFailed, add_common_args, build_specs, default_out,
                     export_sizes, exports_lean, load_models, notice, prepare_manifest, release_unused_encoder,
                     release_weights, resolve_resolution, run_cli, summarize, validate, validation_sizes, weight_bytes)
if TYPE_CHECKING:
    from .specs import GraphSpec



def _dims_for_dynamo(spec: GraphSpec, dynamic: bool) -> dict:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    shapes = {}
    if not dynamic:
        return {t.name: {} for t in spec.inputs}
    f = spec.meta.get("spatial_compression", 1)
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.dims):
            if d == "batch":
                axes[i] = batch
            elif d in ("height", "width"):
                cells = Dim(f"{d}_cells", min=1, max=16384 // f)
                axes[i] = cells * (f // spec.spatial_scale) if spec.spatial_scale == 1 else cells
        shapes[t.name] = axes
    return shapes


# pixel_unshuffle as SpaceToDepth + a channel regrouping instead of the exporters' 6-D Reshape-Transpose-
# Reshape: ONNX's SpaceToDepth puts the block offset before the channel (torch puts it after), so the
# channels are regrouped with a transpose that moves whole H*W planes. Bit-exact, and onnxruntime's
# generic 6-D transpose was 42 of 103 ms of the bundled f64 encoder at 512² (AMD EPYC, 2 threads; the
# encoder's kernels 88 -> 65 ms). Every shape is taken from the input: onnxslim's shape inference gets
# SpaceToDepth's channel count wrong (C*r instead of C*r*r), so nothing may be derived from its output.
def _pixel_unshuffle_torchscript(g, self, downscale_factor):
    import torch
    from torch.onnx import symbolic_helper as sh

    r = sh._get_const(downscale_factor, "i", "downscale_factor")
    const = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))  # noqa: E731
    shape = g.op("Shape", self)
    part = lambda a, b: g.op("Slice", shape, const([a]), const([b]))  # noqa: E731
    blocks = g.op("SpaceToDepth", self, blocksize_i=r)  # N, (r*r, C), H/r, W/r
    split = g.op("Concat", part(0, 1), const([r * r]), part(1, 2), const([-1]), axis_i=0)
    grouped = g.op("Transpose", g.op("Reshape", blocks, split), perm_i=[0, 2, 1, 3])  # N, C, r*r, H*W/r^2
    out = g.op("Concat", part(0, 1), g.op("Mul", part(1, 2), const([r * r])), g.op("Div", part(2, 4), const([r])), axis_i=0)
    return g.op("Reshape", grouped, out)


def _pixel_unshuffle_dynamo(self, downscale_factor: int):
    from onnxscript import opset18 as op

    r = downscale_factor
    blocks = op.SpaceToDepth(self, blocksize=r)
    n, c = op.Shape(self, start=0, end=1), op.Shape(self, start=1, end=2)
    split = op.Concat(n, op.Constant(value_ints=[r * r]), c, op.Constant(value_ints=[-1]), axis=0)
    grouped = op.Transpose(op.Reshape(blocks, split), perm=[0, 2, 1, 3])
    out = op.Concat(n, op.Mul(c, op.Constant(value_ints=[r * r])),
                    op.Div(op.Shape(self, start=2, end=4), op.Constant(value_ints=[r])), axis=0)
    return op.Reshape(grouped, out)


def export_graph(spec: GraphSpec, path: Path, sizes: dict, dynamic: bool, opset: int, exporter: str,
                 lean_above_mb: float = LEAN_ABOVE_MB) -> dict:
    import gc

    import torch

    feeds = spec.trace_inputs(sizes)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    params = weight_bytes(spec)
    external = exports_lean(spec, lean_above_mb)
    if external and exporter == "torchscript":  # it would hold several protobuf copies of the weights
        notice(f"{spec.name}: {params / 1e9:.2f} GB of weights: exporting with dynamo, which streams them into one "
               "external-data file")
        exporter = "dynamo"
    t = time.perf_counter()
    log = io.StringIO()
    # torch's exporter registry warns once per torchvision op when torchvision is absent (always, here)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    fresh(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(spec.module, args, str(path), dynamo=True, opset_version=opset, input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_shapes=_dims_for_dynamo(spec, dynamic),
                              external_data=external, optimize=True, verbose=False,
                              custom_translation_table={torch.ops.aten.pixel_unshuffle.default: _pixel_unshuffle_dynamo})
        else:
            torch.onnx.register_custom_op_symbolic("aten::pixel_unshuffle", _pixel_unshuffle_torchscript, opset)
            torch.onnx.export(spec.module, args, str(path), dynamo=False, opset_version=opset, input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(dynamic),
                              do_constant_folding=True)
    import onnx

    del args
    if exporter == "dynamo":
        forget_rewriter_graphs()
    gc.collect()  # the exported program and the exporter's IR: gone before the proto is read
    external = external or (path.parent / (path.name + ".data")).exists()
    # the graph only: weights in external data stay on disk (never a second in-memory copy)
    model = onnx.load(str(path), load_external_data=False)
    if model.opset_import[0].version != opset and not any(o.domain == "" and o.version == opset for o in model.opset_import):
        raise ExportError(f"{exporter} exporter wrote opset {[o.version for o in model.opset_import if o.domain == '']} "
                          f"instead of the requested {opset}; use --opset 18 or higher with dynamo")
    _name_axes(model, spec, dynamic)
    if external:  # rewrite the graph file only; its tensors keep pointing into the .data file
        path.unlink()
        onnx.save(model, str(path))
    else:
        _save(model, path, external)
    nodes = len(model.graph.node)
    del model
    gc.collect()
    return {"seconds": round(time.perf_counter() - t, 1), "external_data": external, "nodes_exported": nodes,
            "exporter": exporter}


def forget_rewriter_graphs() -> int:
    """onnxscript's rewrite rules are module-level objects that keep the last graph they matched
    (onnxscript 0.7: ``SimplePatternMatcher._graph``, ``_match``, ...), and through its initializers every
    torch weight of the exported module: ``release_weights`` could not free them (paper decoder: 1.65 GB
    stayed resident through validation). Drops those references; returns how many."""
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to drop
        return 0
    dropped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on every live object pokes deprecated torch aliases
        matchers = [obj for obj in gc.get_objects() if isinstance(obj, SimplePatternMatcher)]
    for obj in matchers:
        for attr in ("_graph", "_current_node", "_match", "_tracer"):
            if getattr(obj, attr, None) is not None:
                setattr(obj, attr, None)
                dropped += 1
    return dropped


def _name_axes(model, spec: GraphSpec, dynamic: bool) -> None:
    """Give graph inputs/outputs the spec's axis names (the exporters invent their own)."""
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        t = by_name.get(vi.name)
        if t is None:
            continue
        for dim, d in zip(vi.type.tensor_type.shape.dim, t.dims):
            if isinstance(d, str) and dynamic:
                dim.dim_param = d


def _save(model, path: Path, external: bool) -> None:
    import onnx

    fresh(path)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def simplify(path: Path, tool: str) -> dict:
    """Graph simplification; returns node counts. Large (external-data) graphs are left as they are."""
    import onnx

    if (path.parent / (path.name + ".data")).exists():  # count nodes without reading the weights
        before = len(onnx.load(str(path), load_external_data=False).graph.node)
        if tool != "none":
            notice(f"{path.parent.name}: weights in external data, {tool} skipped (it would load them all); graph kept "
                   "as exported, the runtimes fold its constants at load")
        return {"simplifier": "none" if tool == "none" else "skipped (external data)", "nodes_before": before,
                "nodes_after": before}
    model = onnx.load(str(path))
    before = len(model.graph.node)
    if tool == "none":
        return {"simplifier": "none", "nodes_before": before, "nodes_after": before}
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if tool == "onnxslim":
            import onnxslim

            out = onnxslim.slim(model)
        else:
            import onnxsim

            out, ok = onnxsim.simplify(model)
            if not ok:
                raise ExportError(f"onnxsim could not validate the simplified {path.parent.name} graph; use --no-simplify")
    onnx.checker.check_model(out)
    _save(out, path, external=False)
    return {"simplifier": tool, "nodes_before": before, "nodes_after": len(out.graph.node)}


def large_activation_nodes(model, feeds: dict, limit: float = 1e4) -> list[str]:
    """Nodes that produce or consume tensors exceeding ``limit`` in magnitude on real fp32 inputs:
    fp16 (max 65504) would overflow there (e.g. the un-normalised linear-attention sums)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's output
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, feeds)))
    large = {name for name, v in values.items()
             if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size and np.abs(v).max() > limit}
    # the producer *and* every consumer of a large tensor: a cast to fp16 on either side overflows
    return [n.name for n in model.graph.node if large & (set(n.output) | set(n.input))]


def drop_round_trip_casts(model) -> int:
    """onnxruntime's converter wraps *every* blocked node in casts, so two adjacent fp32 nodes talk
    through fp32 -> fp16 -> fp32, which overflows exactly where we kept fp32. Bypass such pairs."""
    import onnx

    def to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None)

    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in model.graph.node]
    producer = {o: n for n in nodes for o in n.output}
    is_half = lambda name: (name in producer and producer[name].op_type == "Cast"  # noqa: E731
                            and to(producer[name]) == onnx.TensorProto.FLOAT16)
    bypass = {}  # output of a fp32 cast -> the fp32 tensor it round-tripped
    for n in nodes:
        if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT and is_half(n.input[0]):
            src = producer[n.input[0]].input[0]
            if not is_half(src):
                bypass[n.output[0]] = src
    outputs = {o.name for o in model.graph.output}
    kept = [n for n in nodes if not (n.output and n.output[0] in bypass and n.output[0] not in outputs)]
    for n in kept:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    used = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and not set(n.output) & used)]
    removed = len(nodes) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(topological_order(kept, model))
    return removed


def topological_order(nodes: list, model) -> list:
    """The converter appends its input casts at the end; onnx.checker wants producers first."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(range(len(nodes))), []
    while pending:
        progressed = [k for k in pending if all(i in ready for i in nodes[k].input)]
        if not progressed:
            raise ExportError("fp16 conversion produced a cyclic graph")
        for k in progressed:
            ordered.append(nodes[k])
            ready.update(nodes[k].output)
        done = set(progressed)
        pending = [k for k in pending if k not in done]
    return ordered


def to_fp16(src: Path, dst: Path, keep_ops: tuple[str, ...], feeds: dict) -> dict:
    """fp16 weights and compute, fp32 I/O. Kept in fp32: the numerically delicate op types (RMSNorm,
    linear-attention normalisation, softmax/LayerNorm) and every node whose activations on real
    inputs exceed 1e4 (found by running the fp32 graph)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    big = large_activation_nodes(model, feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops), node_block_list=big)
    drop_round_trip_casts(half)
    onnx.checker.check_model(half)
    _save(half, dst, external=False)
    kept = sum(1 for n in model.graph.node if n.op_type in keep_ops)
    return {"fp32_ops": sorted(set(keep_ops)), "nodes_kept_fp32": kept + len(big), "large_activation_nodes": big}


def ort_runner(path: Path, threads: int = 0):
    """``run(feeds) -> outputs`` of an exported file through the session class an app's runtime uses
    (``runtimes.backends.OrtGraph``), so validation runs what ships."""
    from runtimes.backends import OrtGraph

    return OrtGraph(Path(path), "cpu", threads or None).run


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--exporter", choices=["dynamo", "torchscript"], default="torchscript",
                    help="torchscript (default: 3.5x faster here, fewer nodes, same parity) or dynamo (torch.export)")
    ap.add_argument("--fp16", action="store_true", help="also write model_fp16.onnx (validated: PSNR >= 40 dB)")
    ap.add_argument("--no-simplify", action="store_true")
    ap.add_argument("--external-data-above", type=non_negative, default=LEAN_ABOVE_MB, metavar="MB",
                    help="graphs with more weights than this export lean: dynamo streaming one external-data file, "
                         "no simplifier, torch weights freed before validation (default 1024 MB; always above 2 GB)")
    ap.add_argument("--simplifier", choices=["onnxslim", "onnxsim"], default="onnxslim")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.exporter == "dynamo" and args.opset < 18:
        raise ExportError(f"--opset {args.opset}: torch's dynamo exporter only writes opset >= 18 (it would silently "
                          "raise it); use --opset 18+, or --exporter torchscript for older runtimes")
    if args.opset > 23:
        raise ExportError(f"--opset {args.opset}: onnxruntime here supports up to opset 23")

    dynamic = not args.static
    t0 = time.perf_counter()
    ae, ae_info, dn, dn_info = load_models(args)
    out = default_out(args, ae_info)
    print(f"[export.onnx] {ae_info.get('release') or 'variant ' + args.variant} -> {out}")
    res = resolve_resolution(args, ae)
    specs = build_specs(ae, dn, res, args.graphs, (dn_info or {}).get("recipe"))
    if release_unused_encoder(ae, specs, res, dynamic):
        print("  decoder only: photo latents computed up front, encoder weights released")
    print(f"  autoencoder {ae_info['name']} ({ae_info['source']}), {'dynamic' if dynamic else 'static'} shapes, {res}px, "
          f"exporter {args.exporter}, opset {args.opset}" + (f"; denoiser {dn_info['name']}" if dn_info else "; no denoiser"))
    with bundle_transaction(out) as stage:
        manifest = prepare_manifest(stage, args.variant, res, dynamic, ae_info, dn_info)
        manifest["versions"] = package_versions("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "onnxsim", "numpy")
        failures = []
        for spec in specs:
            gdir = stage / spec.name
            gdir.mkdir(exist_ok=True)
            path = gdir / "model.onnx"
            print(f"\n  [{spec.name}] exporting ...", flush=True)
            sizes = validation_sizes(spec, res, dynamic)
            lean = exports_lean(spec, args.external_data_above)
            if lean:  # torch outputs first, so the weights can go before ONNX Runtime loads its own copy
                for vs in sizes:
                    spec.reference(vs)
            info = export_graph(spec, path, export_sizes(spec, res, dynamic), dynamic, args.opset, args.exporter,
                                args.external_data_above)
            if lean and release_weights(spec, specs):
                print("    torch weights released before validation (references computed up front)")
            import onnx

            onnx.checker.check_model(str(path))
            print(f"    -[✓] onnx.checker ({info['nodes_exported']} nodes, {info['seconds']} s)")
            info.update(simplify(path, "none" if args.no_simplify else args.simplifier))
            print(f"    -[✓] {info['simplifier']}: {info['nodes_before']} -> {info['nodes_after']} nodes")
            v = validate(spec, ort_runner(path), sizes, "fp32", "onnxruntime fp32")
            info.update(opset=args.opset, precision="fp32", validation=v)
            manifest["graphs"].setdefault(spec.name, {"artifacts": {}}).update(spec.to_manifest())
            record_artifact(manifest, stage, spec.name, "onnx/fp32", [path] + list(gdir.glob("model.onnx.data")), info)
            if not v["pass"]:
                failures.append(f"{spec.name} fp32")
            if args.fp16:
                hpath = gdir / "model_fp16.onnx"
                hinfo = to_fp16(path, hpath, spec.fp16_keep_ops, spec.examples(sizes[0]))
                try:
                    hv = validate(spec, ort_runner(hpath), sizes, "fp16", "onnxruntime fp16")
                except Exception as e:  # noqa: BLE001 - e.g. a CPU build without an fp16 kernel
                    hv = {"pass": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                    print(f"    -[✗] onnxruntime fp16: {hv['error']}")
                hinfo.update(precision="fp16", validation=hv, opset=args.opset, exporter=args.exporter)
                record_artifact(manifest, stage, spec.name, "onnx/fp16", [hpath], hinfo)
                if not hv["pass"]:
                    failures.append(f"{spec.name} fp16")
        if failures:
            raise ValidationFailed(f"validation failed for {', '.join(failures)} (numbers above)")
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        write_manifest(manifest, stage)
    summarize(manifest, out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
