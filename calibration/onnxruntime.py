"""ONNX Runtime static INT8: QDQ graph ``<graph>/model_int8.onnx`` (artifact "onnx/int8").

Settings (ORT 1.32 docstring and measurements on this kind of CPU, machine notes 2f):

* ``quant_pre_process(skip_symbolic_shape=True)`` first: symbolic shape inference fails on the
  dynamo exporter's dynamic graphs, ONNX shape inference + basic optimisation still run;
* QDQ format, per-channel QInt8 weights, **QUInt8 activations** (S8 activations run 2x *slower*
  than fp32 on x86 with VNNI: ORT's fast U8S8 kernels need unsigned activations);
* **7-bit weights** (``reduce_range``, WEIGHT_BITS): x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
  run U8S8 through VPMADDUBSW, which adds two u8 x s8 products in 16 bits and saturates at 32767 with full
  8-bit weights (255 x 127 x 2 = 64770). The same INT8 encoder, calibrated and gated on a VNNI EPYC, reached
  cosine 0.965 vs fp32 on an AVX2 EPYC (Zen 3) with 8-bit weights and 0.9966 with 7-bit ones (U8U8: 0.9969 but
  1.3x slower). 7 bits cannot saturate (255 x 64 x 2 = 32640), so the gate measured here holds on every CPU;
* only the compute ops Conv / MatMul / Gemm are quantized: with an empty op list ORT would also
  quantize Add/Mul/Softmax/norm glue (the anchors' warning), which costs accuracy and no time;
* MinMax ranges by default (``--method entropy|percentile``: ~10x slower to calibrate); the
  ranges are computed once per graph and cached (``calibration_cache_path``) so the exclusion
  rounds only re-run the quantizer.

Latency: after the gates, convolutions / matmuls that ORT's profiler shows no faster in INT8 on this CPU
(QLinearConv plus the DequantizeLinear of its output, against the float node) go back to float, and the mix
is kept only if the whole graph is faster (or level and more accurate), as for OpenVINO.

Sensitivity: every QuantizeLinear -> DequantizeLinear pair of the QDQ graph is exposed as an output
next to its float input and compared on a few calibration and held-out feeds; weights are
dequantized in numpy.
"""
from __future__ import annotations

import collections
import logging
import shutil
from pathlib import Path

import numpy as np

from export.bundle import fresh
from export.onnx import ort_runner

from . import CalibrationError
from .backend import Backend, log_level
from .data import FeedSet
from .quality import sqnr_db
from .sensitivity import Attempt, Candidate, CompiledOnDemand

OP_TYPES = ("Conv", "MatMul", "Gemm")
WEIGHT_BITS = 7  # reduce_range: no 16-bit saturation on CPUs without VNNI (module docstring)


def methods():
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}


def reader(feeds: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

        def __len__(self):
            return len(feeds)

    return FeedReader()


def qdq_counts(path: Path) -> dict:
    """What the QDQ graph really holds (a silent 'nothing got quantized' shows up as zeros)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    nodes = m.graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    q_out = {n.output[0] for n in nodes if n.op_type == "QuantizeLinear"}
    int8 = {i.name for i in m.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    quantized = quantized_nodes(m)
    return {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
            "qdq_pairs": sum(1 for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in q_out),
            "int8_weights": sum(1 for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in int8),
            "quantized_nodes": len(quantized),
            "quantized_op_types": dict(collections.Counter(n.op_type for n in quantized))}


def quantized_nodes(model) -> list:
    """The compute nodes the quantizer turned into QDQ islands (DequantizeLinear feeds them); float
    nodes that merely read a dequantized tensor do not count."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n for n in model.graph.node if n.op_type in OP_TYPES and set(n.input) & dq_out]


def int8_node_costs(model, t_int8: dict[str, float]) -> dict[str, float]:
    """What each quantized node costs in ORT's optimised INT8 graph, from its profile (ms per node name):
    its QLinearConv / QLinearMatMul (the node's name plus "_token_N"), the DequantizeLinear taking its
    output back to float (named after the output tensor), and the QuantizeLinear of each activation
    input, split between the quantized nodes reading it. A QuantizeLinear that ORT fused into the INT8
    producer before it has no time of its own and costs nothing."""
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized = quantized_nodes(model)

    def input_quantizers(node) -> set[str]:
        names = set()
        for i in node.input:
            dq = producer.get(i)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                names.add(q.name)
        return names

    feeding = {n.name: input_quantizers(n) for n in quantized}
    readers = collections.Counter(q for qs in feeding.values() for q in qs)
    costs = {}
    for node in quantized:
        outs = tuple(o + "_DequantizeLinear" for o in node.output)
        own = sum(v for k, v in t_int8.items() if k.startswith(node.name + "_token_") or k == node.name or k.startswith(outs))
        costs[node.name] = own + sum(t_int8.get(q, 0.0) / readers[q] for q in feeding[node.name])
    return costs


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.ndim:  # per-channel: scales along ``axis``
        shape[axis] = -1
    zero = np.zeros_like(scale) if zero is None else zero
    return (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.astype(np.float32).reshape(shape)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    key = "onnx/int8"
    sources = ("onnx/fp32",)
    filename = "model_int8.onnx"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        if self.args.method not in methods():
            raise CalibrationError(f"--method {self.args.method}: onnxruntime offers {', '.join(methods())}")
        self.feeds: dict[str, list[dict]] = {}

    def settings(self) -> dict:
        return {"format": "QDQ", "weights": "QInt8 per-channel", "weight_bits": WEIGHT_BITS, "activations": "QUInt8",
                "method": self.args.method,
                "op_types": list(OP_TYPES), "pre_process": "quant_pre_process(skip_symbolic_shape=True)"}

    def fp32_runner(self, graph: str):
        return ort_runner(self.source_files(graph)[0])

    def _dir(self, graph: str) -> Path:
        d = self.work / graph
        d.mkdir(parents=True, exist_ok=True)
        return d

    def prepare(self, graph: str, calib: FeedSet) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = self.source_files(graph)[0]
        with log_level("", logging.ERROR):
            quant_pre_process(str(src), str(self._dir(graph) / "pre.onnx"), skip_symbolic_shape=True,
                              save_as_external_data=(src.parent / (src.name + ".data")).exists())
        self.feeds[graph] = calib.feeds

    def quantize(self, graph: str, excluded: list[str]) -> Attempt:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        d = self._dir(graph)
        out = fresh(d / f"int8-{len(excluded)}.onnx")
        with log_level("", logging.ERROR):
            quantize_static(str(d / "pre.onnx"), str(out), reader(self.feeds[graph]), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=WEIGHT_BITS == 7,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods()[self.args.method], nodes_to_exclude=list(excluded),
                            use_external_data_format=(d / "pre.onnx.data").exists(),
                            calibration_cache_path=str(d / "ranges.json"))
        counts = qdq_counts(out)
        if not counts["qdq_pairs"] or not counts["quantized_nodes"]:
            raise CalibrationError(f"{graph}: onnxruntime produced no quantized node ({counts}); nothing would run in INT8")
        return Attempt(run=ort_runner(out), counts=counts, excluded=list(excluded), handle=out)

    def rank(self, graph: str, attempt: Attempt, feeds: list[dict]) -> list[Candidate]:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        model = onnx.load(str(attempt.handle))
        nodes = model.graph.node
        inits = {i.name: i for i in model.graph.initializer}
        float_inits = {i.name: i for i in onnx.load(str(self._dir(graph) / "pre.onnx")).graph.initializer}
        q_input = {n.output[0]: n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
        acts, weights = {}, {}  # DequantizeLinear output -> float activation / float weight name
        sqnr: dict[str, float] = {}
        for n in (n for n in nodes if n.op_type == "DequantizeLinear"):
            if n.input[0] in q_input:
                acts[n.output[0]] = q_input[n.input[0]]
            elif n.input[0] in inits and n.input[0].removesuffix("_quantized") in float_inits:
                w = n.input[0].removesuffix("_quantized")
                weights[n.output[0]] = w
                arr = lambda name: numpy_helper.to_array(inits[name]) if name in inits else None  # noqa: E731
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                zero = arr(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                sqnr[w] = sqnr_db(numpy_helper.to_array(float_inits[w]), dequantize(arr(n.input[0]), arr(n.input[1]), zero, axis))
        # expose every activation next to its fake-quantized copy, run a few calibration feeds
        exposed = sorted(set(acts) | set(acts.values()))
        existing = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                  for t in exposed if t not in existing)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = collections.defaultdict(list)
        for feed in feeds:
            for name, value in zip(exposed, sess.run(exposed, feed)):
                got[name].append(value)
        for dq, x in acts.items():
            sqnr[x] = sqnr_db(np.concatenate(got[x], axis=None), np.concatenate(got[dq], axis=None))
        # a node's damage: the worst tensor it rounds (its inputs through DQ, its outputs through Q)
        quantized_out = set(q_input.values())
        out = []
        for n in quantized_nodes(model):
            touched = [acts.get(i) or weights.get(i) for i in n.input if i in acts or i in weights]
            touched += [o for o in n.output if o in quantized_out]
            scored = [(sqnr[t], t) for t in touched if t in sqnr]
            if scored:
                worst = min(scored)
                label = next((weights[i] for i in n.input if i in weights), "activation x activation")
                out.append(Candidate(n.name, n.op_type, worst[0], worst[1], label))
        return sorted(out, key=lambda c: c.sqnr_db)

    # ---- latency-aware mixed precision: the OpenVINO pass's rule (calibration.__main__.latency_refine), timed
    # with ORT's profiler. ORT's INT8 conv costs its QLinearConv plus the DequantizeLinear that takes its output
    # back to float for the glue (on the encoder's 3-channel stem 13 ms against 4 in fp32) and its share of the
    # QuantizeLinear feeding it (int8_node_costs).
    def _profile(self, path: Path, feeds: dict, optimized: bool, runs: int = 5, warmup: int = 2) -> dict[str, float]:
        """Median kernel ms per node name over ``runs`` runs after ``warmup`` (every node runs once per run,
        so its trace events in time order are its runs). ``optimized=False`` runs ORT's extended level, which
        keeps the original node names (the NCHWc layout pass renames them); those float times are slower than
        the fully optimised graph's, so a conv is kept in float only where INT8 loses even to that."""
        import json
        import statistics

        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
        if not optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.enable_profiling = True
        so.profile_file_prefix = str(self.work / "ort-profile")  # ORT adds a timestamp: one file per session
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        trace = Path(session.end_profiling())
        events = sorted((e for e in json.loads(trace.read_text())
                         if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")), key=lambda e: e["ts"])
        trace.unlink()
        times: dict[str, list[float]] = {}
        for e in events:
            times.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000)
        return {k: statistics.median(v[warmup:] or v) for k, v in times.items()}

    def latency_exclusions(self, graph: str, attempt: Attempt) -> tuple[list[str], list[dict]]:
        import onnx

        feeds = self.feeds[graph][0]
        t_float = self._profile(self._dir(graph) / "pre.onnx", feeds, optimized=False)  # the names the quantizer saw
        t_int8 = self._profile(attempt.handle, feeds, optimized=True)
        rows, slow = [], []
        for name, q in int8_node_costs(onnx.load(str(attempt.handle), load_external_data=False), t_int8).items():
            f = t_float.get(name, 0.0)
            if not f or not q:
                continue
            rows.append({"node": name, "int8_ms": round(q, 3), "fp32_ms": round(f, 3), "int8": q < f})
            if q >= f:
                slow.append(name)
        return slow, rows

    def default_hint(self) -> str:
        return "fp32"

    def float_attempt(self, graph: str) -> Attempt:
        """The fp32 graph INT8 came from, as graph_ms times it (loaded on its first run)."""
        return Attempt(run=CompiledOnDemand(lambda: self.fp32_runner(graph)), counts={}, excluded=[],
                       handle=self.source_files(graph)[0])

    def graph_ms(self, graph: str, attempts: list[Attempt], rounds: int = 7, runs: int = 3) -> list[float]:
        """Median ms of whole INT8 graphs, in interleaved rounds (as OpenVinoBackend.graph_ms)."""
        from dcae_edge.timing import interleaved_medians

        feeds = self.feeds[graph][0]
        for a in attempts:
            a.run(feeds)
        return interleaved_medians([lambda a=a: a.run(feeds) for a in attempts], runs, rounds)

    def save(self, graph: str, attempt: Attempt, gdir: Path) -> list[Path]:
        dst = fresh(gdir / self.filename)
        if not Path(str(attempt.handle) + ".data").exists():
            shutil.copyfile(attempt.handle, dst)
            return [dst]
        import onnx

        model = onnx.load(str(attempt.handle))  # > 2 GB: the weights file takes the new model's name
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data")
        return [dst, Path(str(dst) + ".data")]

    def describe_counts(self, counts: dict) -> str:
        return (f"{counts['quantized_nodes']} quantized nodes {counts['quantized_op_types']}, {counts['qdq_pairs']} "
                f"QuantizeLinear/DequantizeLinear pairs, {counts['int8_weights']} int8 weight tensors")
