"""Core ML INT8: weight compression of the bundle's ML program, ``<graph>/model_int8w.mlpackage``
(artifact "coreml/int8w"; ``--palettize N``: ``model_pal<N>.mlpackage``, "coreml/pal<N>").

* ``ct.optimize.coreml.linear_quantize_weights``: symmetric int8, per output channel (works on
  Linux: pure MIL passes); ``--palettize 4|6|8``: k-means palettes per tensor instead;
* activation quantization (``linear_quantize_activations``) calibrates by running Core ML, so
  only on macOS (W8A8 ``model_int8.mlpackage``, "coreml/int8"); elsewhere it is skipped with the
  reason printed, and the weight-only package is written.

Gates: on macOS the packages are run. Linux cannot run Core ML, so the gate is measured on the
bundle's fp32 ONNX graph (onnxruntime) with the package's *own* compressed weights put back in:
each compressed constant is decompressed by coremltools and matched to its ONNX initializer by
content (fp16-rounded values; names differ between the exporters, layouts may be transposed).
That measures exactly the weight rounding of the package; the fp16 compute error belongs to the
fp16 package and is checked on a Mac. Sensitivity: weight SQNR per constant (data-free).
"""
from __future__ import annotations

import collections
import hashlib
import platform
from pathlib import Path

import numpy as np

from export.coreml import COREML_DTYPES, import_coremltools, quiet, save
from export.onnx import ort_runner

from . import CalibrationError
from .backend import Backend, artifact_id
from .data import FeedSet
from .quality import sqnr_db
from .sensitivity import Attempt, Candidate

WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller constants (biases, norms) stay fp16
SUFFIXES = ("_quantized", "_palettized")  # what coremltools appends to the names of compressed constants


def content_key(a: np.ndarray) -> tuple:
    """Layout-independent identity of a weight: its fp16-rounded values, sorted."""
    return a.size, hashlib.sha1(np.sort(np.asarray(a, dtype=np.float16).ravel()).tobytes()).hexdigest()


def weights(ml, threshold: int = WEIGHT_THRESHOLD) -> dict[str, np.ndarray]:
    from coremltools.optimize import coreml as cto

    with quiet():
        meta = cto.get_weights_metadata(ml, weight_threshold=threshold)
    return {k: v.val for k, v in meta.items() if np.asarray(v.val).dtype.kind == "f"}


def compressed_weights(ml) -> dict[str, np.ndarray]:
    """Original constant name -> the values the compressed package really holds."""
    from coremltools.optimize import coreml as cto

    with quiet():
        plain = cto.decompress_weights(ml)
    out = {}
    for name, val in weights(plain, 0).items():
        base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), None)
        if base:
            out[base] = val
    return out


def program_counts(ml) -> dict:
    """Compressed-weight ops of the ML program and the dtypes of their stored data."""
    from coremltools.proto import MIL_pb2

    spec = ml.get_spec()
    func = spec.mlProgram.functions["main"]
    ops = [op for op in func.block_specializations[func.opset].operations if op.type.startswith("constexpr_")]
    data = collections.Counter()
    for op in ops:
        for key in ("quantized_data", "indices", "data"):
            if key in op.attributes and op.attributes[key].type.HasField("tensorType"):
                data[MIL_pb2.DataType.Name(op.attributes[key].type.tensorType.dataType)] += 1
    return {"compressed_weights": len(ops), "ops": dict(collections.Counter(op.type for op in ops)),
            "stored_as": dict(data), "int8_weights": data["INT8"] + data["UINT8"]}


def orient(values: np.ndarray, onnx_w: np.ndarray, coreml_w: np.ndarray) -> np.ndarray | None:
    """Put Core ML values into the ONNX initializer's layout (same, transposed or reshaped)."""
    ref = np.asarray(onnx_w, dtype=np.float16)
    for f in (lambda a: a, lambda a: a.T, lambda a: a.reshape(ref.shape)):
        try:
            if np.array_equal(f(np.asarray(coreml_w, dtype=np.float16)).reshape(ref.shape), ref):
                return f(values).reshape(ref.shape).astype(np.float32)
        except ValueError:
            continue
    return None


class CoreMLBackend(Backend):
    name = "coreml"
    sources = ("coreml/fp16", "coreml/fp32")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        import_coremltools()
        self.macos = platform.system() == "Darwin"
        if not self.macos:
            print("  Core ML activation quantization skipped: linear_quantize_activations calibrates by running "
                  "Core ML, which needs macOS; writing weight-only INT8 (gates measured through onnxruntime with the "
                  "package's own compressed weights)")
        if self.args.method != "minmax":
            print(f"  --method {self.args.method} ignored: Core ML weight compression needs no activation ranges")
        self.models, self.orig, self.feeds, self.twins, self.onnx_models = {}, {}, {}, {}, {}

    @property
    def w8a8(self) -> bool:
        return self.macos and self.args.palettize is None

    @property
    def key(self) -> str:
        return f"coreml/pal{self.args.palettize}" if self.args.palettize else ("coreml/int8" if self.w8a8 else "coreml/int8w")

    def settings(self) -> dict:
        w = f"{self.args.palettize}-bit k-means palettes per tensor" if self.args.palettize else "int8 symmetric per-channel"
        return {"weights": w, "weight_threshold": WEIGHT_THRESHOLD,
                "activations": "int8 (linear_quantize_activations)" if self.w8a8 else "fp16 (activation quantization needs macOS)",
                "gate_evaluation": "Core ML predict" if self.macos else "onnxruntime fp32 graph with the package's decompressed weights"}

    # ---- the reference: the ONNX twin where Core ML cannot run
    def _onnx(self, graph: str) -> Path | None:
        arts = self.manifest["graphs"].get(graph, {}).get("artifacts", {})
        return self.bundle / arts["onnx/fp32"]["files"][0] if "onnx/fp32" in arts else None

    def model_id(self, graph: str) -> str:
        arts = self.manifest["graphs"].get(graph, {}).get("artifacts", {})
        return artifact_id(self.manifest, arts["onnx/fp32"]) if "onnx/fp32" in arts else super().model_id(graph)

    def _predictor(self, ml, graph: str):
        inputs = self.manifest["graphs"][graph]["inputs"]
        names = self.output_names(graph)

        def run(feeds):
            out = ml.predict({t["name"]: feeds[t["name"]].astype(COREML_DTYPES[t["dtype"]]) for t in inputs})
            return [np.asarray(out[n]) for n in names]

        return run

    def fp32_runner(self, graph: str):
        twin = self._onnx(graph)
        if twin is not None:
            return ort_runner(twin)
        if self.macos:
            return self._predictor(self._load(graph, skip=False), graph)
        raise CalibrationError(f"{graph}: Core ML cannot run on Linux and the bundle has no fp32 ONNX graph to measure "
                               f"the gates with; add it: python -m export.onnx --out {self.bundle} --variant "
                               f"{self.manifest.get('variant')} --resolution {self.manifest['resolution']}"
                               + (" --static" if not self.manifest.get("dynamic") else ""))

    def _load(self, graph: str, skip: bool = True):
        ct = import_coremltools()
        with quiet():
            return ct.models.MLModel(str(self.source_files(graph)[0]), skip_model_load=skip)

    def prepare(self, graph: str, calib: FeedSet) -> None:
        self.models[graph] = self._load(graph, skip=not self.macos)
        self.orig[graph] = weights(self.models[graph])
        self.feeds[graph] = calib.feeds
        if not self.macos:
            self.fp32_runner(graph)  # fails early, with the export command, without an ONNX twin
            self.twins[graph] = self._twin_map(graph)

    def _twin_map(self, graph: str) -> dict[str, tuple[str, np.ndarray]]:
        """Core ML constant name -> (ONNX initializer name, its fp32 value), matched by content."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(self._onnx(graph)))
        by_key = collections.defaultdict(list)
        for init in model.graph.initializer:
            a = numpy_helper.to_array(init)
            if a.dtype == np.float32 and a.size >= WEIGHT_THRESHOLD:
                by_key[content_key(a)].append((init.name, a))
        self.onnx_models[graph] = model
        return {name: by_key[content_key(w)][0] for name, w in self.orig[graph].items() if by_key.get(content_key(w))}

    # ---- quantize, run, rank, save
    def _config(self, excluded: list[str]):
        from coremltools.optimize import coreml as cto

        if self.args.palettize:
            op = cto.OpPalettizerConfig(mode="kmeans", nbits=self.args.palettize)
        else:
            op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                             weight_threshold=WEIGHT_THRESHOLD)
        return cto.OptimizationConfig(global_config=op, op_name_configs={n: None for n in excluded})

    def quantize(self, graph: str, excluded: list[str]) -> Attempt:
        from coremltools.optimize import coreml as cto

        ml = self.models[graph]
        with quiet():
            if self.w8a8:
                quantize_activations = getattr(cto, "linear_quantize_activations", None) or cto.experimental.linear_quantize_activations
                inputs = self.manifest["graphs"][graph]["inputs"]
                samples = [{t["name"]: f[t["name"]].astype(COREML_DTYPES[t["dtype"]]) for t in inputs} for f in self.feeds[graph]]
                ml = quantize_activations(ml, cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                    mode="linear_symmetric")), samples)
            compress = cto.palettize_weights if self.args.palettize else cto.linear_quantize_weights
            q = compress(ml, self._config(excluded))
        counts = program_counts(q)
        if not counts["compressed_weights"]:
            raise CalibrationError(f"{graph}: coremltools compressed no weight ({counts}); nothing would be INT8")
        run = self._predictor(q, graph) if self.macos else self._simulated(graph, q, counts)
        return Attempt(run=run, counts=counts, excluded=list(excluded), handle=q,
                       extra={"gate_evaluation": self.settings()["gate_evaluation"]})

    def _simulated(self, graph: str, q, counts: dict):
        """The ONNX twin with every compressed Core ML weight put in place of its initializer."""
        import onnx
        from onnx import numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.onnx_models[graph])
        replaced, unmatched = {}, []
        for name, values in compressed_weights(q).items():
            if name not in self.twins[graph]:
                unmatched.append(name)
                continue
            init_name, onnx_w = self.twins[graph][name]
            placed = orient(values, onnx_w, self.orig[graph][name])
            if placed is None:
                unmatched.append(name)
            else:
                replaced[init_name] = placed
        if unmatched:  # the gate would silently measure fp32 weights for these
            raise CalibrationError(f"{graph}: {len(unmatched)} compressed Core ML weights have no ONNX counterpart "
                                   f"({unmatched[:3]}); the Linux gate cannot be measured")
        for init in model.graph.initializer:
            if init.name in replaced:
                init.CopyFrom(numpy_helper.from_array(replaced[init.name], init.name))
        counts["simulated_weights"] = len(replaced)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = self.output_names(graph)
        return lambda feeds: sess.run(names, feeds)

    def rank(self, graph: str, attempt: Attempt, feeds: list[dict]) -> list[Candidate]:
        """Data-free: the SQNR of each compressed weight."""
        orig = self.orig[graph]
        twins = self.twins.get(graph, {})
        out = []
        for name, values in compressed_weights(attempt.handle).items():
            if name in orig:
                label = twins[name][0] if name in twins else name
                out.append(Candidate(name, "weight", sqnr_db(orig[name].astype(np.float32), values.astype(np.float32)),
                                     name, label))
        return sorted(out, key=lambda c: c.sqnr_db)

    def save(self, graph: str, attempt: Attempt, gdir: Path) -> list[Path]:
        stem = self.key.split("/")[1]
        path = gdir / f"model_{stem}.mlpackage"
        save(attempt.handle, path)  # export.coreml.save replaces the folder, never writes into it
        attempt.counts.update(program_counts(attempt.handle))
        return [path]

    def describe_counts(self, counts: dict) -> str:
        return (f"{counts['compressed_weights']} compressed weights {counts['ops']} stored as {counts['stored_as']}"
                + (f", gate measured with {counts['simulated_weights']} of them in the ONNX twin" if "simulated_weights" in counts else ""))
