"""The app-facing API: open an exported bundle and encode / decode / generate with numpy arrays.

    from runtimes import open_bundle, load_image, to_pil
    pipe = open_bundle("exports/f64", backend="onnxruntime")        # or "openvino", "coreml"
    latents = pipe.encode(load_image("photo.jpg", size=512))         # N x 128 x 8 x 8, unscaled
    images = pipe.decode(latents)                                    # N x 3 x 512 x 512 in [-1, 1]
    to_pil(pipe.generate(class_labels=[0, 1], steps=30, cfg_scale=3.0, seed=0))[0].save("gen.png")

Imports numpy, Pillow and the chosen runtime only: never torch (except backend="torch", the
reference). The sampler maths is ``dcae_edge.schedules``, shared with the torch sampler.
"""
from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np

from dcae_edge import schedules
from dcae_edge.files import sha256_file

from .backends import (ARTIFACT_PREFIX, BACKENDS, CoreMLGraph, ExecuTorchGraph, OpenVinoGraph, OrtGraph, RuntimeUnavailable,
                       TorchGraph)
from .precision import OPENVINO_ONLY, int8_saturation_risk, openvino_artifacts, openvino_hint
from .images import as_model_input
from .safety import UnsafeBundle, check_manifest_paths, check_onnx_external_data
from .tiling import tiled_apply

SUPPORTED_MANIFEST_VERSION = 1
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "int8-bf16")  # bf16 / int8-bf16: OpenVINO only (precision.py)


class BundleError(ValueError):
    """The bundle cannot be used as asked; the message says what to do."""


class NonFiniteOutput(BundleError):
    """A graph returned NaN/Inf on finite inputs: an overflow at a reduced precision (fp16 on a GPU or an NPU)."""

    def __init__(self, message: str, count: int):
        super().__init__(message)
        self.count = count


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{path} has no manifest.json: not an exported bundle (make one with python -m export.onnx)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is corrupt ({e}); export the bundle again") from None
    if m.get("format") != "dcae-edge-bundle":
        raise BundleError(f"{mpath} is not a dcae-edge bundle manifest")
    try:
        check_manifest_paths(path, m)
    except UnsafeBundle as e:
        raise BundleError(str(e)) from None
    if m.get("manifest_version", 0) > SUPPORTED_MANIFEST_VERSION:
        raise BundleError(f"{path} was written by a newer dcae-edge (manifest v{m['manifest_version']}, this runtime "
                          f"reads v{SUPPORTED_MANIFEST_VERSION}); upgrade: pip install -U dcae-edge")
    if verify:
        verify_files(path, m, list(m.get("files", {})))
    return m


def verify_files(path: Path, manifest: dict, files: list[str]) -> None:
    """Refuse missing, truncated or tampered files (size, then sha256 against the manifest)."""

    for rel in files:
        meta = manifest["files"].get(rel)
        f = path / rel
        if meta is None:
            raise BundleError(f"{f} is not listed in the manifest; the bundle was modified after export")
        if not f.is_file():
            raise BundleError(f"{f} is missing from the bundle; copy the whole bundle folder again")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"{f} is truncated or altered ({f.stat().st_size} bytes, manifest says {meta['bytes']}); "
                              "copy the bundle again")
        if sha256_file(f) != meta["sha256"]:
            raise BundleError(f"{f} does not match its checksum in the manifest (tampered or corrupt); "
                              "copy the bundle again or re-export it")


# the devices a backend takes by name (OpenVINO: any device its Core has, checked when a graph is compiled)
DEVICES = {"onnxruntime": ("cpu", "cuda"), "coreml": ("cpu",), "executorch": ("cpu",)}


class Pipeline:
    def __init__(self, bundle: str | Path, backend: str = "onnxruntime", precision: str = "auto", device: str = "cpu",
                 threads: int | None = None, verify: bool = True, tile_overlap: float = 0.25, weights: str | None = None,
                 format: str = "onnx", providers: list[str] | None = None):
        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if format not in ("onnx", "ort", "ort-runtime"):
            raise BundleError(f"unknown format {format!r}: onnx | ort (ORT format, fixed optimizations) | ort-runtime "
                              "(ORT format for NNAPI / Core ML execution providers)")
        if format != "onnx" and backend != "onnxruntime":
            raise BundleError(f"format={format!r} is an onnxruntime format; use backend='onnxruntime'")
        self.format, self.providers = format, providers
        for p in (precision.values() if isinstance(precision, dict) else [precision]):
            if p not in PRECISIONS:
                raise BundleError(f"unknown precision {p!r}: choose one of {', '.join(PRECISIONS)}")
            if backend == "torch" and p not in ("auto", "fp32"):  # not run as fp32 under another name
                raise BundleError(f"precision {p!r}: backend 'torch' runs the model the bundle came from in fp32 (the "
                                  "reference); the other precisions are exported graphs: use backend onnxruntime or openvino")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise BundleError(f"threads={threads!r}: give a count >= 1, or None for the runtime's default")
        if backend in DEVICES and device not in DEVICES[backend]:  # not a silent run on the CPU under another name
            raise BundleError(f"device={device!r}: backend {backend!r} runs on {' or '.join(map(repr, DEVICES[backend]))}"
                              + ("; other accelerators through providers=[...]" if backend == "onnxruntime" else ""))
        self.path = Path(bundle)
        self.manifest = read_manifest(self.path, verify=False)
        if isinstance(precision, dict) and set(precision) - set(self.manifest["graphs"]):
            raise BundleError(f"precision for {', '.join(sorted(set(precision) - set(self.manifest['graphs'])))}: "
                              f"{self.path} has no such graph; it holds {', '.join(self.manifest['graphs'])}")
        self.backend, self.precision, self.device, self.threads = backend, precision, device, threads
        self.verify = verify
        self.weights = weights  # torch backend only: where the exported weights are
        self.tile_overlap = tile_overlap
        self._runners: dict = {}
        self._auto: dict[str, str] = {}
        self._runners_lock = threading.Lock()  # threads sharing a pipeline load each graph once
        ae = self.manifest["autoencoder"]
        self.scaling_factor = float(ae["scaling_factor"])
        self.spatial_compression = int(ae["spatial_compression"])
        self.resolution = int(self.manifest["resolution"])
        self.latent_channels = int(ae["config"]["latent_channels"])
        dn = self.manifest.get("denoiser")
        self.class_names = (dn or {}).get("class_names", [])

    # ------------------------------------------------------------------------------------------ artifacts
    def available(self) -> dict[str, list[str]]:
        return {g: sorted(info["artifacts"]) for g, info in self.manifest["graphs"].items()}

    def _require_graph(self, graph: str) -> None:
        if graph not in self.manifest["graphs"]:
            hint = " (export it with a denoiser: python -m export.onnx --denoiser ...)" if graph == "transformer" else ""
            raise BundleError(f"{self.path} has no {graph} graph{hint}; it holds {', '.join(self.manifest['graphs'])}")

    def precision_of(self, graph: str) -> str:
        """The precision a graph runs at: the one asked for, or for "auto" the fastest gated
        artifact on this CPU (probed once, cached; see runtimes.precision)."""
        if isinstance(self.precision, dict):  # per graph, e.g. {"transformer": "int8"}; others fp32
            return self.precision.get(graph, "fp32")
        if self.precision != "auto":
            return self.precision
        if graph not in self._auto:
            from .precision import resolve

            self._require_graph(graph)
            self._auto[graph] = resolve(self.manifest, graph, self.backend, self.format, self.threads,
                                        lambda p: Pipeline(self.path, self.backend, p, self.device, self.threads, self.verify,
                                                           format=self.format, providers=self.providers))[0]
        return self._auto[graph]

    def _artifact(self, graph: str, resolution: int | None = None) -> tuple[str, dict]:
        self._require_graph(graph)
        arts = self.manifest["graphs"][graph]["artifacts"]
        if self.backend == "torch":
            return "torch", {}
        precision = self.precision_of(graph)
        prefix = self.format if self.backend == "onnxruntime" else ARTIFACT_PREFIX[self.backend]
        if precision in OPENVINO_ONLY and self.backend != "openvino":
            raise BundleError(f"{graph}: precision {precision!r} is an OpenVINO precision; backend {self.backend!r} runs "
                              "fp32 / fp16 / int8 (or precision='auto')")
        if self.backend == "openvino":
            keys = openvino_artifacts(precision)
        elif self.backend == "coreml":
            keys = {"fp16": ["coreml/fp16", "coreml/fp32"], "fp32": ["coreml/fp32"],
                    "int8": ["coreml/int8w", "coreml/int8"]}.get(precision, [])
            keys = [k for k in arts if k.split("@")[0] in keys]
            if resolution is not None:  # one fixed-shape package per resolution
                match = [k for k in keys if arts[k].get("resolution") in (resolution, None)]
                if keys and not match:
                    have = sorted({arts[k].get("resolution") for k in keys if arts[k].get("resolution")})
                    raise BundleError(f"{graph}: no Core ML package for {resolution}px; this bundle has "
                                      f"{', '.join(map(str, have))}px (python -m export.coreml --resolution ... {resolution})")
                keys = match
        else:
            keys = [f"{prefix}/{precision}"]
        for k in keys:
            if k in arts:
                self._check_runtime_version(k, arts[k])
                return k, arts[k]
        how = {"ort": "python -m export.mobile --bundle " + str(self.path), "ort-runtime": "python -m export.mobile --bundle "
               + str(self.path), "pte": "python -m export.mobile --bundle " + str(self.path)}.get(prefix, "export or calibrate it first")
        what = self.backend if prefix in ("onnx",) or self.backend != "onnxruntime" else f"{prefix}"
        raise BundleError(f"{graph}: no {what} {precision} artifact in {self.path} (available: "
                          f"{', '.join(sorted(arts))}); {how}")

    def _check_runtime_version(self, key: str, info: dict) -> None:
        """ORT-format files are tied to the onnxruntime release that wrote them (no compatibility
        promise for minimal builds): refuse another major.minor with what to do."""
        if not key.startswith("ort"):
            return
        import onnxruntime

        made = str(info.get("onnxruntime_version", "?"))
        if made.split(".")[:2] != onnxruntime.__version__.split(".")[:2]:
            raise BundleError(f"{key} was converted by onnxruntime {made}; this is {onnxruntime.__version__}. Install "
                              f"onnxruntime=={made} (pip install onnxruntime=={made}) or re-export: python -m export.mobile "
                              f"--bundle {self.path}")

    def _runner(self, graph: str, resolution: int | None = None):
        key, info = self._artifact(graph, resolution)
        cache_key = (graph, key, self.precision_of(graph))
        with self._runners_lock:
            return self._runners.get(cache_key) or self._load_runner(graph, key, info, cache_key)

    def _load_runner(self, graph: str, key: str, info: dict, cache_key: tuple):
        if cache_key not in self._runners:
            if self.backend == "torch":
                runner = TorchGraph(graph, self.manifest, self.device, self.weights)
            else:
                files = info["files"]
                if self.verify:
                    verify_files(self.path, self.manifest,
                                 [f for f in self.manifest["files"] if any(f == x or f.startswith(x + "/") for x in files)])
                main = self.path / files[0]
                if main.suffix == ".onnx":
                    try:
                        check_onnx_external_data(self.path, files[0], self.manifest)
                    except UnsafeBundle as e:
                        raise BundleError(str(e)) from None
                risk = int8_saturation_risk(self.manifest, graph, self.backend) if key.endswith("/int8") and self.device == "cpu" else None
                if risk:  # asked for by name (auto never picks it here): run it, but say what it costs
                    warnings.warn(risk, stacklevel=3)
                if self.backend == "onnxruntime":
                    runner = OrtGraph(main, self.device, self.threads, self.providers)
                elif self.backend == "executorch":
                    g = self.manifest["graphs"][graph]
                    runner = ExecuTorchGraph(main, [t["name"] for t in g["inputs"]], [t["name"] for t in g["outputs"]])
                elif self.backend == "openvino":
                    runner = OpenVinoGraph(main, "CPU" if self.device == "cpu" else self.device,
                                           openvino_hint(self.precision_of(graph)), self.threads)
                else:
                    runner = CoreMLGraph(main)
            runner.static = bool(info.get("fixed_shapes")) or not self.manifest.get("dynamic", True)
            runner.static_batch = info.get("batch")
            self._runners[cache_key] = runner
        return self._runners[cache_key]

    # ------------------------------------------------------------------------------------------ shapes
    @property
    def _fixed_shapes(self) -> bool:
        """Core ML packages and ExecuTorch programs are fixed-shape (batch 1 at the bundle
        resolution; the transformer a CFG pair), and so is a --static bundle."""
        return not self.manifest.get("dynamic", True) or self.backend in ("coreml", "executorch")

    @property
    def active_providers(self) -> dict[str, list[str]]:
        """Per loaded graph, the execution providers really running it."""
        return {g: getattr(r, "active_providers", [getattr(r, "provider", "?")]) for (g, *_), r in self._runners.items()}

    def ran_as(self) -> dict[str, str]:
        """Per loaded graph, the precision it really runs at, in words: what a CLI reports after a run
        (a bf16 asked of a CPU without native bf16 runs in f32, and says so)."""
        return {g: p + (" (run as f32: no native bf16 here)" if getattr(r, "bf16_as_f32", False) else "")
                for (g, _, p), r in self._runners.items()}

    def ran_as_line(self) -> str:
        """``ran_as`` on one line, for a CLI's last line: "onnxruntime: vae_encoder fp32, vae_decoder int8"."""
        return f"{self.backend}: " + ", ".join(f"{g} {p}" for g, p in self.ran_as().items())

    def _branch_ok(self, graph: str, height_px: int, width_px: int) -> bool:
        g = self.manifest["graphs"][graph]
        return all(((height_px // s["scale"]) * (width_px // s["scale"]) > g["head_dim"]) == s["linear"]
                   for s in g.get("attention_stages", []))

    def _run_batched(self, runner, feeds: dict[str, np.ndarray], static_batch: int | None) -> np.ndarray:
        n = next(iter(feeds.values())).shape[0]
        if not static_batch or static_batch == n:
            out = runner.run(feeds)[0]
        else:
            out = np.concatenate([runner.run({k: v[i:i + static_batch] for k, v in feeds.items()})[0]
                                  for i in range(0, n, static_batch)])
        bad = int((~np.isfinite(out)).sum())
        if bad:  # never hand an app silent NaN
            raise NonFiniteOutput(f"{getattr(runner, 'provider', self.backend)} returned {bad} NaN/Inf values "
                                  f"({self.backend} {self.precision}); try fp32, or re-export the bundle", bad)
        return out

    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], static_batch: int | None,
                   resolution: int | None = None) -> np.ndarray:
        """One call of a graph. Under precision "auto", an overflow (NaN/Inf out of finite inputs) at a reduced
        precision is not the app's problem: that call runs again at fp32, which the graph keeps from then on, with a
        warning. A precision asked for by name is kept, and the error says what to do."""
        was = "fp32" if self.backend == "torch" else self.precision_of(graph)  # before the run: threads share _auto
        try:
            return self._run_batched(self._runner(graph, resolution), feeds, static_batch)
        except NonFiniteOutput as e:
            error = NonFiniteOutput(f"{graph} ({self.backend} {was}) returned {e.count} NaN/Inf values: " + (
                "at fp32, on finite inputs: the weights or the export are broken; re-export the bundle" if was == "fp32"
                else "an overflow at this precision; run it at fp32"), e.count)
            if self.precision != "auto" or was == "fp32":
                raise error from None
            with self._runners_lock:
                if self._auto.get(graph) == was:  # else another thread already moved it
                    self._auto[graph] = "fp32"
                    try:
                        self._artifact(graph, resolution)
                    except BundleError:  # no fp32 artifact to fall back on (e.g. Core ML fp16 packages only)
                        self._auto[graph] = was
                        raise error from None
                    for k in [k for k in self._runners if k[0] == graph and k[2] == was]:
                        del self._runners[k]  # its memory back
                    warnings.warn(f"{graph} at {was} returned {e.count} NaN/Inf values on this input (an overflow at "
                                  f"{was}): precision auto runs it at fp32 from now on", stacklevel=3)
            return self._run_batched(self._runner(graph, resolution), feeds, static_batch)

    def _spatial(self, graph: str, x: np.ndarray, in_name: str, scale: float, tile: int | None) -> np.ndarray:
        """Run an autoencoder graph on NCHW ``x`` directly, or tiled when the graph cannot take its size."""
        self._require_graph(graph)
        f, res = self.spatial_compression, self.resolution
        unit = 1 if graph == "vae_encoder" else f  # pixels per input cell
        h, w = x.shape[2] * unit, x.shape[3] * unit
        if h % f or w % f:
            raise BundleError(f"image size {w}x{h} is not a multiple of the compression factor {f}; crop or pad it")
        static = self._fixed_shapes
        direct = (not tile) and ((h, w) == (res, res) if static else self._branch_ok(graph, h, w))
        if direct:
            return self._run_graph(graph, {in_name: x}, 1 if static else None, h if self.backend == "coreml" else None)
        tile_px = tile or res
        if h < tile_px or w < tile_px:
            raise BundleError(f"{graph}: {w}x{h}px cannot run on this bundle ({'static at' if static else 'exported at'} "
                              f"{res}px, and smaller than one {tile_px}px tile); resize to {res}x{res}, or export at "
                              f"--resolution {max(f, h // f * f)}")
        if tile_px % f or (not static and not self._branch_ok(graph, tile_px, tile_px)) or (static and tile_px != res):
            raise BundleError(f"tile {tile_px}px does not fit this bundle's {graph} graph; use tile={res}")
        size = tile_px if self.backend == "coreml" else None
        overlap = max(f, int(round(tile_px * self.tile_overlap / f)) * f)
        return tiled_apply(lambda t: self._run_graph(graph, {in_name: t}, 1 if static else None, size),
                           x, tile_px // unit, overlap // unit, scale)

    # ------------------------------------------------------------------------------------------ API
    def encode(self, images, tile: int | None = None) -> np.ndarray:
        """Images (PIL, uint8 HWC/NHWC, or float NCHW in [-1, 1]) -> unscaled latents (float32 NCHW).
        Images larger than the graph allows are encoded in overlapping tiles (``tile`` px)."""
        x = as_model_input(images)
        return self._spatial("vae_encoder", x, "sample", 1 / self.spatial_compression, tile)

    def decode(self, latents: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Unscaled latents -> images float32 NCHW in [-1, 1] (not clipped, like torch)."""
        z = np.asarray(latents)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise BundleError(f"latents must be N x {self.latent_channels} x h x w, got {tuple(z.shape)}")
        if z.dtype.kind != "f":
            raise BundleError(f"latents must be floating point (unscaled encoder outputs), got dtype {z.dtype}")
        if not np.isfinite(z).all():
            raise BundleError(f"latents contain {int((~np.isfinite(z)).sum())} NaN/Inf values")
        if z.dtype != np.float32:
            z = z.astype(np.float32)
        return self._spatial("vae_decoder", z, "latent_sample", self.spatial_compression, tile)

    def reconstruct(self, images, tile: int | None = None) -> np.ndarray:
        return self.decode(self.encode(images, tile), tile)

    @property
    def recipe(self) -> dict:
        """How this bundle's denoiser samples (manifest ``sampler``): solver, steps, guidance, ..."""
        return schedules.recipe_of_manifest(self.manifest)

    def class_ids(self, classes) -> list[int]:
        """Class ids from ids or names (``"7"``, ``7``, ``"golden retriever"``)."""
        from dcae_edge.classes import resolve_classes

        dn = self.manifest.get("denoiser") or {}
        return resolve_classes(classes, self.class_names, int(dn.get("config", {}).get("num_classes", 0)))

    def generate(self, class_labels=None, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                 sampler: str | None = None, n: int = 1, return_latents: bool = False, latents=None):
        """Sample with the bundle's denoiser and its recipe (same maths and noise as
        ``dcae_edge.sample``), then decode. ``steps``/``cfg_scale``/``sampler`` default to the recipe;
        ``latents``: explicit initial noise (N x C x h x w) instead of the seed's."""
        dn = self.manifest.get("denoiser")
        if not dn or "transformer" not in self.manifest["graphs"]:
            raise BundleError(f"{self.path} has no denoiser: export one with python -m export.onnx --denoiser FILE")
        cfg = dn["config"]
        conditional = cfg["num_classes"] > 0
        if conditional:
            if class_labels is None or not len(class_labels):
                names = self.class_names[:10]
                raise BundleError(f"this denoiser is class-conditional: pass class_labels in [0, {cfg['num_classes'] - 1}]"
                                  + (f" ({', '.join(f'{i}={c}' for i, c in enumerate(names))}"
                                     f"{', ...' if len(self.class_names) > 10 else ''})" if names else ""))
            try:
                labels = np.asarray(self.class_ids(class_labels), dtype=np.int64)
            except ValueError as e:
                raise BundleError(str(e)) from None
        else:
            if class_labels is not None and len(class_labels):
                raise BundleError("this denoiser is unconditional: pass no class_labels (use n=...)")
            labels = None
        self._runner("transformer")  # loaded (and auto resolved) before the first step
        static_batch = 2 if self._fixed_shapes else None  # the sampler splits the batch itself
        try:
            z = schedules.generate_numpy(self.recipe, lambda feed: self._run_graph("transformer", feed, None), labels, n,
                                         steps, cfg_scale, seed,
                                         latents, sampler, static_batch=static_batch)
        except schedules.SamplerError as e:
            raise BundleError(str(e)) from None
        images = self.decode(z / float(self.recipe.get("latent_scaling_factor") or dn["latent_scaling_factor"]))
        return (images, z) if return_latents else images


def open_bundle(bundle: str | Path, backend: str = "onnxruntime", precision: str = "auto", device: str = "cpu",
                threads: int | None = None, verify: bool = True, weights: str | None = None, format: str = "onnx",
                providers: list[str] | None = None) -> Pipeline:
    """Open an exported bundle (manifest and checksums are checked when a graph is first loaded).
    ``precision``: "auto" (per graph, the fastest artifact that passed its quality gate on this CPU;
    says what it picked), or "fp32" / "fp16" / "bf16" (OpenVINO) / "int8" / "int8-bf16" (OpenVINO) to force one;
    ``format``: "onnx", or "ort" / "ort-runtime" (ORT-format files, backend onnxruntime);
    ``providers``: onnxruntime execution providers to ask for (e.g. ["xnnpack"]);
    ``weights``: for backend="torch", the checkpoint or released folder the bundle came from."""
    return Pipeline(bundle, backend, precision, device, threads, verify, weights=weights, format=format, providers=providers)


__all__ = ["Pipeline", "open_bundle", "read_manifest", "BundleError", "RuntimeUnavailable"]
