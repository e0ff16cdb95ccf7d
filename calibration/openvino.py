"""OpenVINO INT8 with NNCF: ``<graph>/openvino_model_int8.xml/.bin`` (artifact "openvino/int8").

* ``nncf.quantize`` on the bundle's IR (fp32 or fp16 weights); only the compute ops (convolutions,
  MatMul) get FakeQuantizes, like onnxruntime (everything else is in ``ignored_scope`` by type,
  with the nodes the sensitivity step keeps in float by name). ``ModelType.TRANSFORMER`` for the
  transformer graph (NNCF's mixed preset and transformer patterns), with SmoothQuant off unless
  ``--smooth-quant``. ``--method``: minmax (default: NNCF's min/max statistics) / percentile (NNCF
  mean quantile) / entropy (NNCF histogram) activation ranges.
* ``--max-drop``: ``nncf.quantize_with_accuracy_control`` instead of our exclusion rounds; NNCF
  reverts layers until the metric drops at most that much. Metric: decoder = reconstruction PSNR
  of the decoded held-out photos (dB; fp32 vs a decoder's own output would be an infinite PSNR);
  encoder / transformer = cosine to the fp32 outputs (budget 1 - their gate's min cosine).
* NNCF's overflow fix on **every** layer (its default: the first only), i.e. 7-bit weight ranges: x86 CPUs
  without VNNI (AVX2, early AVX-512) add pairs of u8 x s8 products in 16 bits and saturate with full 8-bit
  weights. On an AVX2 EPYC (Zen 3) the tiny test encoder's INT8 graph missed its gate (cosine 0.93) with the
  first layer fixed and passed with all of them; the gate measured on any CPU then holds on every CPU.
  (Depthwise convolutions keep 8-bit weights: NNCF leaves them out, they add no pairs of products.)

Every quantization is parked in the work folder as an IR the moment NNCF returns it (the attempt holds its
path): a model in memory keeps the source IR it was quantized from mapped, so the paper-size f64c128 decoder's
second quantization (the latency mix) ran beside the first one's 1.65 GB of source weights and its INT8
constants (peak RSS 8.5 GiB, Intel Xeon with AMX; one quantization alone peaks at 6.7). Runs compile from the
path; the artifact is a copy of the parked files.

The IR is saved without fp16 compression, so NNCF's quantized weights are stored as int8
constants (a quarter of the fp32 .bin). Gates run the INT8 IR with INFERENCE_PRECISION_HINT=f32,
so they measure the INT8 error alone; the same gate is then run with the bf16 hint for the float
remainder and recorded as the artifact's ``validation_bf16`` (precision "int8-bf16" in the runtimes).
Sensitivity: every activation FakeQuantize is exposed next to its input and compared on a few
calibration and held-out feeds; weight FakeQuantizes are applied to their constants in numpy.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from dcae_edge.compare import compare
from dcae_edge.timing import interleaved_medians
from export.openvino import ov_runner, profile_together
from runtimes.backends import compile_for

from . import CalibrationError
from .backend import Backend, log_level
from .data import FeedSet
from .quality import shown, sqnr_db
from .sensitivity import Attempt, Candidate, CompiledOnDemand, Outcome, rank_feeds

ESTIMATORS = {"minmax": None, "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}  # None: NNCF's min/max default
# only the compute ops are quantized, as for onnxruntime: NNCF's CPU preset would also put
# FakeQuantizes on Add/Multiply/ReduceMean/Divide (RMSNorm, attention normalisation), which
# measured 32.3 dB instead of 38.3 dB on the tiny decoder and cosine 0.949 instead of 0.982 on the encoder
COMPUTE_OPS = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul"}
PASS_THROUGH = ("Convert", "Reshape", "Transpose")  # between a weight constant and its FakeQuantize


def fake_quantize(x, lo, hi, out_lo, out_hi, levels):
    """OpenVINO FakeQuantize semantics (numpy, broadcasting per-channel limits)."""
    q = np.round((np.clip(x, lo, hi) - lo) / (hi - lo) * (levels - 1))
    return q / (levels - 1) * (out_hi - out_lo) + out_lo


def constant_source(output):
    """The Constant behind a FakeQuantize input (through Convert/Reshape/Transpose), or None."""
    node = output.get_node()
    while node.get_type_name() in PASS_THROUGH:
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def consumers(fq) -> list:
    """The ops reading a FakeQuantize (graph outputs are not ops NNCF can ignore)."""
    return [t.get_node() for t in fq.output(0).get_target_inputs() if t.get_node().get_type_name() != "Result"]


def as_model(model):
    """An ov.Model, read from an IR path if that is what ``model`` is (a parked attempt)."""
    if hasattr(model, "get_ops"):
        return model
    import openvino as ov

    return ov.Core().read_model(str(model))


def quantized_ops(model) -> set[str]:
    """Friendly names of the ops a FakeQuantize feeds (NNCF's ignored_scope takes these names); ``model``: an
    ov.Model or an IR path."""
    model = as_model(model)
    return {c.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize" for c in consumers(op)}


def op_costs(node_ms: dict[tuple[str, str, str], float], model) -> dict[str, float]:
    """ms per op a FakeQuantize feeds in ``model`` (for a float graph: the same names), from the CPU
    plugin's per-node times (``profile_nodes``): the op's own node(s) plus the FakeQuantizes feeding it and
    the layout reorders into it or into them. An INT8 op's quantize step does not fuse into a producer
    with other readers (the residual stream, attention's split): it then runs alone in f32 between a
    bf16-to-f32 and an i8 reorder, which cost more than INT8 saved on the bundled f64 decoder's narrow
    convolutions (a reorder is named ``<producer>_<formats>_<consumer>``, so it is charged to its consumer).
    ``model``: an ov.Model or an IR path."""
    model = as_model(model)
    ops = set()
    feeds_into: dict[str, list[str]] = {}  # FakeQuantize name -> the quantized ops it feeds
    for fq in (op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"):
        readers = [c.get_friendly_name() for c in consumers(fq)]
        feeds_into[fq.get_friendly_name()] = readers
        ops.update(readers)
    if not ops:  # a float graph: the names of the compute ops the INT8 graph would quantize
        ops = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in COMPUTE_OPS}
    owners = {**{o: [o] for o in ops}, **feeds_into}
    by_length = sorted(owners, key=len, reverse=True)
    cost: collections.Counter = collections.Counter()
    for (node, kind, _), ms in node_ms.items():
        owner = next((o for o in by_length if node == o or node.startswith(o + "/")), None)  # the op or a part named after it
        if owner is None and kind == "Reorder":
            owner = next((o for o in by_length if node.endswith("_" + o)), None)
        for op in owners.get(owner, []):
            cost[op] += ms / len(owners[owner])
    return dict(cost)


def shortcut_convolutions(model) -> list[str]:
    """Convolutions whose weights hold one value besides zeros: export.graph_forms' shortcut copies (ones) and
    averages (1/g), data movement written as a convolution; no trained layer looks like that. Never quantized:
    they compute no learned function, and INT8 copies of the residual stream would only add their rounding."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            weights = constant_source(op.input_value(1))
            if weights is None:
                continue
            w = weights.get_data().ravel()
            nonzero = w[w != 0]
            if nonzero.size and (nonzero == nonzero[0]).all():
                names.append(op.get_friendly_name())
    return names


def ir_counts(model) -> dict:
    ops = collections.Counter(op.get_type_name() for op in model.get_ops())
    consts = collections.Counter(op.get_element_type().get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant")
    return {"FakeQuantize": ops["FakeQuantize"], "int8_constants": consts["i8"] + consts["u8"],
            "quantized_ops": len(quantized_ops(model))}


class OpenVinoBackend(Backend):
    name = "openvino"
    key = "openvino/int8"
    sources = ("openvino/fp32", "openvino/fp16w")
    filename = "openvino_model_int8.xml"

    def __init__(self, *a, **kw):
        import openvino as ov

        super().__init__(*a, **kw)
        self.core = ov.Core()
        self.feeds: dict[str, list[dict]] = {}

    def settings(self) -> dict:
        return {"tool": "nncf.quantize" + ("_with_accuracy_control" if self.args.max_drop is not None else ""),
                "activation_ranges": ESTIMATORS[self.args.method] or "nncf default (min/max)",
                "quantized_op_types": sorted(COMPUTE_OPS), "transformer_model_type": "TRANSFORMER",
                "smooth_quant": bool(self.args.smooth_quant), "weight_bits": 7, "overflow_fix": "all layers",
                "gate_inference_precision": "f32", **({"max_drop": self.args.max_drop} if self.args.max_drop is not None else {})}

    def _outputs(self, graph: str):
        return SimpleNamespace(output_names=self.output_names(graph))

    def _runner(self, graph: str, model):
        return CompiledOnDemand(lambda: ov_runner(self.core, model, self._outputs(graph), "f32")[0])

    def bf16_run(self, graph: str, attempt: Attempt):
        """(run, precision executed) of an INT8 attempt with INFERENCE_PRECISION_HINT=bf16."""
        return ov_runner(self.core, attempt.handle, self._outputs(graph), "bf16")

    def fp32_runner(self, graph: str):
        return self._runner(graph, self._source(graph))

    def prepare(self, graph: str, calib: FeedSet) -> None:
        self.feeds[graph] = calib.feeds

    def _source(self, graph: str) -> str:
        """The float IR INT8 is made from (its path: compiled or read where needed, not held)."""
        return str(self.source_files(graph)[0])

    def _read(self, graph: str):
        return self.core.read_model(self._source(graph))

    def _options(self, graph: str, model, excluded: list[str]) -> tuple[dict, object]:
        """nncf.quantize keyword arguments and advanced parameters."""
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters, OverflowFix
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        advanced = {"overflow_fix": OverflowFix.ENABLE}  # 7-bit weights on every layer (module docstring)
        if ESTIMATORS[self.args.method]:
            advanced["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, ESTIMATORS[self.args.method])
        if not self.args.smooth_quant:  # NNCF applies it to TRANSFORMER models; it cost cosine 0.964 vs 0.9999 on the DiT
            advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
        other_types = sorted({op.get_type_name() for op in model.get_ops()} - COMPUTE_OPS)
        opts = {"subset_size": len(self.feeds[graph]),
                "model_type": nncf.ModelType.TRANSFORMER if graph == "transformer" else None,
                "ignored_scope": nncf.IgnoredScope(names=list(excluded) + shortcut_convolutions(model), types=other_types,
                                                   validate=False)}
        return opts, AdvancedQuantizationParameters(**advanced)

    def _attempt(self, graph: str, model, excluded: list[str]) -> Attempt:
        counts = ir_counts(model)
        if not counts["FakeQuantize"]:
            raise CalibrationError(f"{graph}: NNCF inserted no FakeQuantize ({counts}); nothing would run in INT8")
        xml = self._park(graph, model)
        return Attempt(run=self._runner(graph, xml), counts=counts, excluded=list(excluded), handle=xml)

    def _park(self, graph: str, model) -> str:
        """``model`` saved as the next IR in the work folder (see the module docstring): its path."""
        import openvino as ov

        folder = self.work / graph
        folder.mkdir(parents=True, exist_ok=True)
        xml = folder / f"int8-{len(list(folder.glob('int8-*.xml')))}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return str(xml)

    def quantize(self, graph: str, excluded: list[str]) -> Attempt:
        import nncf

        model = self._read(graph)
        opts, advanced = self._options(graph, model, excluded)
        with log_level("nncf", logging.WARNING):
            q = nncf.quantize(model, nncf.Dataset(self.feeds[graph]), advanced_parameters=advanced, **opts)
        return self._attempt(graph, q, excluded)

    def rank(self, graph: str, attempt: Attempt, feeds: list[dict]) -> list[Candidate]:
        model = as_model(attempt.handle)  # read afresh: outputs are added to it
        sqnr: dict[str, tuple[float, str]] = {}  # FakeQuantize name -> (SQNR, what it quantizes)
        acts = []
        for fq in (op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"):
            limits = [constant_source(fq.input_value(i)) for i in range(1, 5)]
            src = constant_source(fq.input_value(0))
            if src is not None and all(limits):  # weights: apply the FakeQuantize in numpy
                w = src.get_data().astype(np.float32)
                if w.shape == tuple(fq.get_input_shape(0)):
                    fq_w = fake_quantize(w, *(c.get_data().astype(np.float32) for c in limits), fq.get_attributes()["levels"])
                    sqnr[fq.get_friendly_name()] = (sqnr_db(w, fq_w), src.get_friendly_name())
            else:
                acts.append(fq)
        model.add_outputs([p for fq in acts for p in (fq.input_value(0), fq.output(0))])
        # outputs are de-duplicated (a tensor feeding two FakeQuantizes): find each by its producer port
        port = lambda p: (p.get_node().get_friendly_name(), p.get_index())  # noqa: E731
        index = {port(out.get_node().input_value(0)): i for i, out in enumerate(model.outputs)}
        compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = collections.defaultdict(list)
        for feed in feeds:
            res = compiled(feed)
            for i in set(index.values()):
                got[i].append(np.asarray(res[i]))
        for fq in acts:
            x, y = (np.concatenate(got[index[port(p)]], axis=None) for p in (fq.input_value(0), fq.output(0)))
            sqnr[fq.get_friendly_name()] = (sqnr_db(x, y), fq.input_value(0).get_node().get_friendly_name())
        # a node's damage: the worst FakeQuantize feeding it
        worst: dict[str, Candidate] = {}
        for fq in (op for op in model.get_ops() if op.get_type_name() == "FakeQuantize" and op.get_friendly_name() in sqnr):
            value, tensor = sqnr[fq.get_friendly_name()]
            for c in consumers(fq):
                name = c.get_friendly_name()
                if name not in worst or value < worst[name].sqnr_db:
                    weight = next((constant_source(c.input_value(i)) for i in range(c.get_input_size())
                                   if constant_source(c.input_value(i)) is not None), None)
                    worst[name] = Candidate(name, c.get_type_name(), value, tensor,
                                            weight.get_friendly_name() if weight is not None else "activation x activation")
        return sorted(worst.values(), key=lambda c: c.sqnr_db)

    def accuracy_control(self, graph: str, calib: FeedSet, held: FeedSet, reference: np.ndarray, gates, evaluate) -> Outcome:
        """nncf.quantize_with_accuracy_control; the layers NNCF reverted are reported as kept in float."""
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        per = len(reference) // len(held.feeds)
        if graph == "vae_decoder":  # PSNR of the decoded held-out photos (the fp32 decoder's own is finite)
            targets, metric, budget = held.photos, "psnr", self.args.max_drop
        else:
            targets, metric, budget = reference, "cosine", 1 - gates.tolerance(graph)["min_cosine"]
        items = [{"feeds": f, "target": targets[i * per:(i + 1) * per]} for i, f in enumerate(held.feeds)]

        def validation_fn(compiled, data):
            values = [compare(shown(graph, item["target"]), shown(graph, np.asarray(compiled(item["feeds"])[0])))[metric]
                      for item in data]
            return float(np.mean(values)), values

        model = self._read(graph)
        opts, advanced = self._options(graph, model, [])
        plain = self.quantize(graph, [])
        with log_level("nncf", logging.WARNING), contextlib.redirect_stdout(io.StringIO()):
            q = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(self.feeds[graph]),
                nncf.Dataset(items, lambda item: item["feeds"]), validation_fn, max_drop=budget,
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=self.args.max_rounds),
                **opts)
        reverted = quantized_ops(plain.handle) - quantized_ops(q)
        ranking = self.rank(graph, plain, rank_feeds(calib, held))
        excluded = [c for c in ranking if c.node in reverted]
        for c in excluded:
            c.tensor += f"; reverted by NNCF accuracy control (max drop {budget:g} {metric})"
        attempt = self._attempt(graph, q, [c.node for c in excluded])
        gate = evaluate(attempt)
        return Outcome(attempt, gate, excluded, ranking, [{"round": 0, "excluded": len(excluded), "gate": gate, "seconds": 0}],
                       mode=f"NNCF accuracy control (max drop {budget:g} {metric})")

    # ---- latency-aware mixed precision: INT8 only where it is faster on this CPU
    def layer_times(self, models: list, feeds: dict, hint: str, runs: int = 9) -> list[dict[str, float]]:
        """Median ms per quantized op of each model at ``hint`` (the float part's precision: this CPU's
        default, bf16 where it has native bf16), from OpenVINO's performance counters with the models' runs
        taking turns, with what the op brings along charged to it (``op_costs``)."""
        profiles = profile_together(self.core, models, feeds, hint, runs)
        return [op_costs(nodes, model) for nodes, model in zip(profiles, models)]

    def default_hint(self) -> str:
        """The CPU plugin's default float precision here: bf16 where the CPU has native bf16, else f32."""
        return "bf16" if "bf16" in self.core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name() else "f32"

    def float_attempt(self, graph: str) -> Attempt:
        """The float IR INT8 came from, as graph_ms times it (at the default hint: bf16 where the CPU has it)."""
        return Attempt(run=None, counts={}, excluded=[], handle=self._source(graph))

    def graph_ms(self, graph: str, attempts: list[Attempt], rounds: int = 7, runs: int = 3) -> list[float]:
        """Median ms of whole INT8 graphs at the default hint, measured in interleaved rounds (on a shared
        machine a slow spell then hits every candidate alike)."""
        feeds = self.feeds[graph][0]
        requests = []
        for a in attempts:
            request = compile_for(self.core, a.handle, feeds, {"INFERENCE_PRECISION_HINT": self.default_hint()}).create_infer_request()
            for _ in range(2):
                request.infer(feeds)
            requests.append(request)
        return interleaved_medians([lambda r=r: r.infer(feeds) for r in requests], runs, rounds)

    def latency_exclusions(self, graph: str, attempt: Attempt) -> tuple[list[str], list[dict]]:
        """Quantized ops whose INT8 node, with the FakeQuantizes and layout reorders it brings, runs no faster
        than the same op (with its reorders) in the float graph at the CPU's default precision: keep those
        in float."""
        hint = self.default_hint()
        feeds = self.feeds[graph][0]
        int8 = self.core.read_model(attempt.handle)  # read once: profiled, and its ops named, below
        t_float, t_int8 = self.layer_times([self._read(graph), int8], feeds, hint)
        rows, slow = [], []
        for name in sorted(quantized_ops(int8)):
            f, q = t_float.get(name), t_int8.get(name)
            if not f or not q:
                continue
            keep_float = q >= f
            rows.append({"node": name, "int8_ms": round(q, 3), f"{hint}_ms": round(f, 3), "int8": not keep_float})
            if keep_float:
                slow.append(name)
        return slow, rows

    def save(self, graph: str, attempt: Attempt, gdir: Path) -> list[Path]:
        xml = gdir / self.filename
        files = [xml, xml.with_suffix(".bin")]
        for f in files:  # staging hard-links the live bundle: replace files, never rewrite them in place
            f.unlink(missing_ok=True)
        parked = Path(attempt.handle)
        shutil.copyfile(parked, xml)
        shutil.copyfile(parked.with_suffix(".bin"), xml.with_suffix(".bin"))
        attempt.counts.update(ir_counts(self.core.read_model(str(xml))))  # what the saved IR holds
        return files

    def describe_counts(self, counts: dict) -> str:
        return (f"{counts['FakeQuantize']} FakeQuantize feeding {counts['quantized_ops']} ops"
                + (f", {counts['int8_constants']} int8 constants" if counts.get("int8_constants") else ""))
