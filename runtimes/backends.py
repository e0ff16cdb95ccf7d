"""One ``run(feeds) -> outputs`` interface per runtime. Imports only numpy and the runtime asked
for (never torch, except the torch reference backend)."""
from __future__ import annotations

import platform
import queue
import threading
from pathlib import Path

import numpy as np

BACKENDS = ("onnxruntime", "openvino", "coreml", "executorch", "torch")
ARTIFACT_PREFIX = {"onnxruntime": "onnx", "openvino": "openvino", "coreml": "coreml", "executorch": "pte"}
EP_NAMES = {"xnnpack": "XnnpackExecutionProvider", "nnapi": "NnapiExecutionProvider", "coreml": "CoreMLExecutionProvider",
            "cuda": "CUDAExecutionProvider", "qnn": "QNNExecutionProvider", "webgpu": "WebGpuExecutionProvider",
            "cpu": "CPUExecutionProvider"}


class RuntimeUnavailable(RuntimeError):
    """The backend is not installed or cannot run on this machine."""


def _require(module: str, backend: str, pip: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeUnavailable(f"backend {backend!r} needs the {module!r} package: pip install {pip}") from None


class OrtGraph:
    """onnxruntime InferenceSession of an ``.onnx`` or ORT-format ``.ort`` file. ``device='cuda'``
    asks for the CUDA provider and refuses a silent CPU fallback; ``providers`` (e.g. ["xnnpack"])
    asks for others: one that is not the one running is reported (a warning and
    ``active_providers``), never silently (the PyPI wheel has CPU only; XNNPACK, NNAPI, Core ML
    ship in the mobile packages)."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, providers: list[str] | None = None):
        import warnings

        ort = _require("onnxruntime", "onnxruntime", "onnxruntime (or onnxruntime-gpu on CUDA machines)")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if Path(str(path) + ".data").exists():  # weights in external data (a paper-size model): no arena, no
            so.enable_cpu_mem_arena = False     # pre-planned buffers, which would hold a second copy's worth
            so.enable_mem_pattern = False
        if str(path).endswith(".ort"):
            so.add_session_config_entry("session.load_model_format", "ORT")
            # saved runtime optimizations are recorded for ARM (export.mobile: target_platform arm), where a
            # minimal build replays them; an x86 full build re-derives its own, and replaying ARM's QDQ records
            # fails there ("Not enough produced nodes in the runtime optimization record")
            if ".with_runtime_opt." in str(path) and platform.machine().lower() in ("arm64", "aarch64"):
                so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        wanted = [EP_NAMES.get(p.lower(), p) for p in (providers or [])]
        available = set(ort.get_available_providers())
        chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
        base = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=chosen + base)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeUnavailable("onnxruntime could not load its CUDA provider (install onnxruntime-gpu with a "
                                     "matching CUDA/cuDNN); refusing to fall back to CPU silently")
        self.active_providers = self.session.get_providers()
        missing = [p for p in wanted if p not in self.active_providers]
        if missing:
            warnings.warn(f"onnxruntime: {', '.join(missing)} asked for but not available in this build (it has "
                          f"{', '.join(sorted(available))}); running on {self.active_providers[0]}", stacklevel=3)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.provider = self.session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})


def openvino_config(hint: str, threads: int | None = None) -> dict:
    """compile_model settings for one INFERENCE_PRECISION_HINT: latency mode (one request at a time, as an
    app decoding an image), ``threads`` compute threads (0/None: the plugin's choice)."""
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


# The CPU plugin runs a model with dynamic inputs through shape-agnostic kernels; compiled for the shapes
# it is fed, the bundled f64 (AMD EPYC, 2 threads, 512²) ran its encoder 10-17% and its decoder 1-4% faster.
# So a dynamic IR is compiled once per input shape seen (the first call of a shape pays the compile), up to
# STATIC_SHAPES shapes, the oldest dropped; above STATIC_MAX_WEIGHTS_MB of weights the dynamic model is compiled
# once instead (a compiled model per shape would hold the paper-size weights again for a few percent).
STATIC_SHAPES = 4
STATIC_MAX_WEIGHTS_MB = 512


def with_static_shapes(model, shapes: dict[str, tuple[int, ...]]):
    """A copy of the ov.Model ``model`` whose inputs have the given shapes (its dynamic axes fixed)."""
    ov = _require("openvino", "openvino", "openvino")
    fixed = model.clone()
    new = {}
    for port in fixed.inputs:  # by any of the port's names (an NNCF-quantized IR's input can carry several)
        name = next((n for n in port.get_names() if n in shapes), None)
        if name is None:
            raise KeyError(f"no shape given for input {port.get_any_name()!r} (given: {sorted(shapes)})")
        new[port] = ov.PartialShape([int(d) for d in shapes[name]])
    fixed.reshape(new)
    return fixed


def compiles_per_shape(model) -> bool:
    """A dynamic model with at most STATIC_MAX_WEIGHTS_MB of constants (see STATIC_SHAPES)."""
    if not any(p.get_partial_shape().is_dynamic for p in model.inputs):
        return False
    weights = sum(op.get_byte_size() for op in model.get_ops() if op.get_type_name() == "Constant")
    return weights <= STATIC_MAX_WEIGHTS_MB * 2**20


def compile_for(core, model, feeds: dict[str, np.ndarray], config: dict, device: str = "CPU"):
    """``model`` (an ov.Model or an IR path) compiled for the shapes of ``feeds`` where OpenVinoGraph would
    (compiles_per_shape), else as it is: what a profile or a latency comparison should time."""
    if not hasattr(model, "inputs"):
        model = core.read_model(str(model))
    if compiles_per_shape(model):
        model = with_static_shapes(model, {name: np.shape(x) for name, x in feeds.items()})
    return core.compile_model(model, device, config)


class _Compiled:
    """One compiled model and its idle infer requests: one request runs one call at a time ("Infer Request is
    busy"), so a pool, grown on demand, lets threads sharing a pipeline run in parallel."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        self.idle.put(compiled.create_infer_request())

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        try:
            request = self.idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.infer(feeds)
            return [request.get_tensor(n).data.copy() for n in output_names]
        finally:
            self.idle.put(request)


_BF16 = {}


def openvino_runs_bf16(device: str = "CPU") -> bool:
    """Whether OpenVINO's plugin has native bf16 here (AVX512-BF16, AMX, ...): without it the bf16 hint
    silently runs f32, so "bf16" and "int8-bf16" are not distinct precisions on this machine."""
    if device not in _BF16:
        ov = _require("openvino", "openvino", "openvino")
        _BF16[device] = "BF16" in {c.upper() for c in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")}
    return _BF16[device]


VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")  # OpenVINO devices that pick or combine real ones


class OpenVinoGraph:
    """OpenVINO compiled model. ``hint`` is INFERENCE_PRECISION_HINT: f32 for exact parity; bf16 is
    this CPU's fast default and must be asked for explicitly here. A dynamic IR is compiled per input
    shape (see STATIC_SHAPES); ``static=False`` compiles the dynamic model as it is."""

    def __init__(self, path: Path, device: str = "CPU", hint: str = "f32", threads: int | None = None,
                 static: bool = True):
        ov = _require("openvino", "openvino", "openvino")
        self.core = ov.Core()
        self.device, self.config = device.upper(), openvino_config(hint, threads)
        have = self.core.available_devices
        if self.device.split(":")[0] not in VIRTUAL_DEVICES and not {self.device, self.device.split(".")[0]} & \
                {d for name in have for d in (name, name.split(".")[0])}:
            raise RuntimeUnavailable(f"OpenVINO has no {self.device} device on this machine (it has {', '.join(have)}); "
                                     "device='cpu' runs everywhere")
        model = self.core.read_model(str(path))
        self.per_shape = static and compiles_per_shape(model)
        self._model = model if self.per_shape else None
        self._by_shape: dict[tuple, _Compiled] = {}  # insertion order = age
        self._lock = threading.Lock()
        self._dynamic = None if self.per_shape else _Compiled(self.core.compile_model(model, self.device, self.config))
        # names as the IR declares them: a compiled port can carry extra names from fused ops (an
        # NNCF-quantized IR's input showed up as '63' besides 'latent_sample'), and get_any_name may pick those
        self.input_names = [p.get_any_name() for p in model.inputs]
        self.output_names = [p.get_any_name() for p in model.outputs]
        self.input_shapes = {p.get_any_name(): [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
                             for p in model.inputs}
        self.provider = f"openvino:{self.device}:{hint}"
        self.bf16_as_f32 = hint == "bf16" and not openvino_runs_bf16(self.device)
        if self.bf16_as_f32:
            import warnings

            warnings.warn(f"{path.parent.name}/{path.name}: bf16 asked for, but this {self.device} has no native bf16: OpenVINO runs it in f32 "
                          "(the same as precision fp32 / int8 here)", stacklevel=2)
            self.provider = f"openvino:{self.device}:f32 (bf16 asked; no native bf16)"

    def compiled_for(self, feeds: dict[str, np.ndarray]) -> _Compiled:
        """The compiled model for these feeds' shapes (compiled on first sight of the shapes)."""
        if not self.per_shape:
            return self._dynamic
        key = tuple(tuple(np.shape(feeds[n])) for n in self.input_names)
        with self._lock:  # one compile per shape, also when threads share the pipeline
            compiled = self._by_shape.get(key)
            if compiled is None:
                while len(self._by_shape) >= STATIC_SHAPES:
                    self._by_shape.pop(next(iter(self._by_shape)))
                compiled = self._by_shape[key] = _Compiled(compile_for(self.core, self._model, feeds, self.config, self.device))
            return compiled

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {k: feeds[k] for k in self.input_names}
        return self.compiled_for(feeds).run(feeds, self.output_names)


class ExecuTorchGraph:
    """An ExecuTorch program (``.pte``, XNNPACK delegate) through executorch's Python runtime. On a
    phone the C++ runtime runs the same file without torch; this Linux binding passes torch
    tensors, so this one backend needs torch."""

    def __init__(self, path: Path, input_names: list[str], output_names: list[str]):
        rt = _require("executorch.runtime", "executorch", "'dcae-edge[mobile]'")
        try:  # kernels for quantize/dequantize nodes an int8 program keeps outside the XNNPACK delegate
            import executorch.kernels.quantized  # noqa: F401
        except ImportError:
            pass
        try:
            self.program = rt.Runtime.get().load_program(str(path))
            self.method = self.program.load_method("forward")
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one clear line
            raise RuntimeUnavailable(f"{path}: ExecuTorch cannot load this program ({type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else 'invalid .pte'}); "
                                     "re-export it with python -m export.mobile") from None
        self.input_names, self.output_names = input_names, output_names
        self._lock = threading.Lock()
        self.input_shapes = {}
        self.active_providers = ["XnnpackBackend"]
        self.provider = "executorch:xnnpack"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with self._lock:  # one loaded method runs one call at a time
            outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in self.input_names])
        return [o.numpy() if hasattr(o, "numpy") else np.asarray(o) for o in outs]


class CoreMLGraph:
    """A Core ML package (macOS only). int64 class labels travel as int32 (Core ML has no int64)."""

    def __init__(self, path: Path, compute_units: str = "ALL"):
        if platform.system() != "Darwin":
            raise RuntimeUnavailable("Core ML models run only on macOS/iOS; on this machine use onnxruntime or openvino")
        ct = _require("coremltools", "coreml", "coremltools")
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        spec = self.model.get_spec()
        self.input_names = [i.name for i in spec.description.input]
        self.output_names = [o.name for o in spec.description.output]
        self.input_shapes = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
        self.provider = f"coreml:{compute_units}"
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ins = {k: (feeds[k].astype(np.int32) if feeds[k].dtype == np.int64 else feeds[k]) for k in self.input_names}
        with self._lock:
            out = self.model.predict(ins)
        return [np.asarray(out[n], dtype=np.float32) for n in self.output_names]


class TorchGraph:
    """The torch model itself (reference backend; needs torch and the weights the bundle was
    exported from), wrapped exactly as it was exported (export.specs). The manifest names its
    weights without paths: bundled weights are found by name, anything else is passed as
    ``weights`` (a checkpoint, or a released generator folder); fingerprints must match."""

    def __init__(self, graph: str, manifest: dict, device: str = "cpu", weights: str | None = None):
        _require("torch", "torch", "torch")
        from dcae_edge.checkpoints import load_autoencoder, model_fingerprint
        from dcae_edge.denoiser import load_denoiser
        from export.specs import TransformerGraph, VaeDecoderGraph, VaeEncoderGraph, uses_learned_variance

        part = manifest["denoiser"] if graph == "transformer" else manifest["autoencoder"]
        release = part.get("release")
        if release:
            if not weights:
                raise RuntimeUnavailable(f"the torch reference of {release} needs its folder: pass weights=PATH "
                                         "(--weights) to the released model")
            from dcae_edge.official import load_diffusion_model

            m = load_diffusion_model(weights)
            model = m.denoiser if graph == "transformer" else m.autoencoder
        else:
            src = weights or self._bundled(part["source"])
            model = load_denoiser(src)[0] if graph == "transformer" else load_autoencoder(src)
        if model_fingerprint(model) != part["fingerprint"]:
            raise RuntimeUnavailable(f"{graph}: the torch weights ({weights or part['source']}) are not the ones this "
                                     "bundle was exported from (fingerprint mismatch)")
        if graph == "transformer":
            self.module = TransformerGraph(model, uses_learned_variance(model, manifest.get("sampler")))
            self.input_names = ["hidden_states", "timestep", "class_labels"]
        else:
            self.module = VaeEncoderGraph(model) if graph == "vae_encoder" else VaeDecoderGraph(model)
            self.input_names = ["sample"] if graph == "vae_encoder" else ["latent_sample"]
        self.module = self.module.to(device).eval()
        self.device = device
        self.input_shapes = {}
        self.provider = f"torch:{device}"

    @staticmethod
    def _bundled(source: str, how: str = "pass weights=PATH") -> str:
        """The weights a bundle was exported from, on this machine; ``how``: what the caller's user passes instead."""
        from dcae_edge.checkpoints import BUNDLED_DIR

        if (BUNDLED_DIR / source).is_file():
            return str(BUNDLED_DIR / source)
        if Path(source).exists() or "/" not in source:
            return source  # a variant alias, preset, random:..., or a path that exists here
        raise RuntimeUnavailable(f"the torch reference needs the weights this bundle was exported from ({source}); {how}")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[k])).to(self.device) for k in self.input_names]
            return [self.module(*args).float().cpu().numpy()]
