"""Graph specs: the one description of each exported graph, shared by every backend.

A ``GraphSpec`` holds the torch wrapper to trace, the ordered input/output tensor specs (names
follow optimum: encoder ``sample`` -> ``latent_sample``, decoder ``latent_sample`` -> ``sample``,
denoiser ``hidden_states, timestep, class_labels`` -> ``sample``), dynamic axes with output axes
derived from input axes, realistic example inputs (real photos, their latents, inputs recorded
along a real sampling trajectory), per-precision tolerances, the ops kept in fp32 when a graph is
converted to fp16, and the attention-branch rule that limits which shapes a traced graph serves.

ONNX (export/onnx.py), OpenVINO (export/openvino.py), Core ML (export/coreml.py), calibration and
the runtimes read these specs; none of them re-declares a name, axis or tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:
    import torch

    _Module = torch.nn.Module
except ImportError:  # the app-only install has no torch: specs can be read, graphs not traced
    torch, _Module = None, object

GRAPH_NAMES = ("vae_encoder", "vae_decoder", "transformer")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name: "float32" | "int64"
    dims: tuple                     # ints (static) or axis names / expressions ("height / 64")

    def shape_for(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape given values of the symbolic axes (expressions use / and *)."""
        return tuple(d if isinstance(d, int) else int(eval(d, {}, dict(sizes))) for d in self.dims)  # noqa: S307

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.dims)}


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one precision against the torch fp32 reference."""
    max_abs: float | None = None     # fp32: |out - ref| <= max_abs + rel * max|ref|
    rel: float = 0.0
    min_psnr: float | None = None    # fp16 / bf16: PSNR (peak = reference range)
    min_cosine: float | None = None  # int8

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and not (k == "rel" and v == 0.0)}


# fp32 parity on images in [-1, 1]: 1e-4 absolute (issue #3); latents/denoiser outputs are larger,
# so 1e-4 + 1e-5 x max|ref|. fp16: 40 dB; INT8 gates live in calibration/.
IMAGE_TOLERANCES = {"fp32": Tolerance(max_abs=1e-4), "fp16": Tolerance(min_psnr=40.0), "bf16": Tolerance(min_psnr=35.0)}
TENSOR_TOLERANCES = {"fp32": Tolerance(max_abs=1e-4, rel=1e-5), "fp16": Tolerance(min_psnr=40.0), "bf16": Tolerance(min_psnr=35.0)}


@dataclass
class GraphSpec:
    name: str
    module: object                               # torch.nn.Module taking the inputs positionally, in order
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: Callable[[dict[str, int]], dict[str, np.ndarray]]  # sizes -> feeds (numpy)
    tolerances: dict[str, Tolerance]
    fp16_keep_ops: tuple[str, ...] = ()           # ONNX op types kept in fp32 by --fp16
    attention_stages: list[dict] = field(default_factory=list)  # [{"scale": s, "linear": bool}] at export sizes
    head_dim: int = 32
    spatial_scale: int = 1                        # input pixels per spatial axis unit of the size dict
    meta: dict = field(default_factory=dict)

    _cache: dict = field(default_factory=dict, repr=False)

    def examples(self, sizes: dict[str, int]) -> dict[str, np.ndarray]:
        """``example_inputs`` computed once per size (a decoder's examples run the encoder on
        photos: at paper size, seconds and gigabytes each time)."""
        key = ("in", tuple(sorted(sizes.items())))
        if key not in self._cache:
            self._cache[key] = self.example_inputs(sizes)
        return self._cache[key]

    def trace_inputs(self, sizes: dict[str, int]) -> dict[str, np.ndarray]:
        """Inputs to trace with: values do not matter, only shapes, so a larger batch repeats the
        batch-1 example instead of computing new ones."""
        b = sizes.get("batch", 1)
        if self.name == "transformer" or b == 1:
            return self.examples(sizes)
        one = self.examples({**sizes, "batch": 1})
        return {k: np.ascontiguousarray(np.concatenate([v] * b)) for k, v in one.items()}

    def reference(self, sizes: dict[str, int]) -> list[np.ndarray]:
        """Torch fp32 outputs on ``examples(sizes)``, computed once (every backend validates against them)."""
        key = ("ref", tuple(sorted(sizes.items())))
        if key not in self._cache:
            with torch.no_grad():
                feeds = self.examples(sizes)
                out = self.module(*[torch.from_numpy(feeds[n]) for n in self.input_names])
            outs = out if isinstance(out, (tuple, list)) else [out]
            self._cache[key] = [o.float().numpy() for o in outs]
        return self._cache[key]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self, dynamic: bool) -> dict[str, dict[int, str]]:
        """{tensor: {axis: name}} (torchscript-exporter style); empty for static graphs."""
        axes = {}
        for t in self.inputs + self.outputs:
            a = {i: d for i, d in enumerate(t.dims) if isinstance(d, str) and dynamic}
            if a:
                axes[t.name] = a
        return axes

    def branch_pattern(self, height: int, width: int) -> list[bool]:
        """Which attention stages take the linear branch for a graph input of this spatial size
        (pixels for the encoder, latent cells for the decoder: ``spatial_scale`` converts)."""
        h, w = height * self.spatial_scale, width * self.spatial_scale
        return [(h // s["scale"]) * (w // s["scale"]) > self.head_dim for s in self.attention_stages]

    def check_shape_supported(self, height: int, width: int) -> None:
        """A traced graph holds one attention branch per stage: refuse sizes that would flip one."""
        want = [s["linear"] for s in self.attention_stages]
        got = self.branch_pattern(height, width)
        if want != got:
            raise ValueError(
                f"{self.name}: an input of {height}x{width} makes DC-AE switch attention branch (linear vs quadratic "
                f"at <= {self.head_dim} tokens) in a stage that was exported with the other branch; export a graph at "
                "this resolution (--resolution, --static)")

    def to_manifest(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "tolerances": {k: v.to_dict() for k, v in self.tolerances.items()},
                "attention_stages": self.attention_stages, "head_dim": self.head_dim, **self.meta}


# ---------------------------------------------------------------------------------------------- DC-AE
def _evit_stages(types, depths, head_dim, height, width, scale_of) -> list[dict]:
    """Attention stages with their downsampling relative to the *pixel* size, and the branch they
    take at the export size."""
    return [{"stage": i, "scale": scale_of(i), "linear": (height // scale_of(i)) * (width // scale_of(i)) > head_dim}
            for i, (t, d) in enumerate(zip(types, depths)) if t == "EfficientViTBlock" and d > 0]


class VaeEncoderGraph(_Module):
    """sample -> latent_sample (unscaled). No input checks: they are data-dependent and break tracing."""

    def __init__(self, ae):
        super().__init__()
        self.encoder = ae.encoder

    def forward(self, sample):
        return self.encoder(sample)


class VaeDecoderGraph(_Module):
    def __init__(self, ae):
        super().__init__()
        self.decoder = ae.decoder

    def forward(self, latent_sample):
        return self.decoder(latent_sample)


class TransformerGraph(_Module):
    """(hidden_states, timestep, class_labels) -> the prediction (C channels), plus DiT's learned
    variance (C more) when the sampler uses it (ADM ancestral steps); otherwise it is dropped."""

    def __init__(self, denoiser, keep_variance: bool = False):
        super().__init__()
        self.denoiser = denoiser  # its forward, not only its network: flow_skip / class_prior terms are part of the model
        self.channels = denoiser.config.in_channels
        self.conditional = denoiser.config.conditional
        self.drop_variance = denoiser.config.learn_sigma and not keep_variance

    def forward(self, hidden_states, timestep, class_labels):
        out = self.denoiser(hidden_states, timestep, class_labels if self.conditional else None)
        # slice only when there is something to drop: a no-op slice exports as an `alias` node
        # that coremltools cannot convert
        return out[:, : self.channels] if self.drop_variance else out


def uses_learned_variance(denoiser, recipe: dict | None) -> bool:
    return bool(denoiser.config.learn_sigma and recipe and recipe.get("solver", {}).get("name") == "adm")


AE_FP16_KEEP_OPS = ("MatMul", "Div", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Clip", "Max")


def vae_encoder_spec(ae, height: int, width: int | None = None) -> GraphSpec:
    from dcae_edge.data import sample_photos

    width = width or height
    f = ae.config.spatial_compression

    def examples(sizes):
        x = sample_photos((sizes["height"], sizes["width"]), sizes.get("batch", 1)).numpy()
        return {"sample": x}

    return GraphSpec(
        name="vae_encoder", module=VaeEncoderGraph(ae).eval(),
        inputs=[TensorSpec("sample", "float32", ("batch", ae.config.in_channels, "height", "width"))],
        outputs=[TensorSpec("latent_sample", "float32", ("batch", ae.config.latent_channels, f"height / {f}", f"width / {f}"))],
        example_inputs=examples, tolerances=TENSOR_TOLERANCES, fp16_keep_ops=AE_FP16_KEEP_OPS,
        attention_stages=_evit_stages(ae.config.encoder_block_types, ae.config.encoder_layers_per_block,
                                      ae.config.attention_head_dim, height, width, lambda i: 2**i),
        head_dim=ae.config.attention_head_dim, spatial_scale=1, meta={"spatial_compression": f})


def vae_decoder_spec(ae, height: int, width: int | None = None) -> GraphSpec:
    from dcae_edge.data import sample_photos

    width = width or height
    f = ae.config.spatial_compression

    encoded: dict[int, np.ndarray] = {}  # batch -> the largest photo latents encoded so far

    def examples(sizes):  # what the decoder really sees: latents of real photos
        b, h, w = sizes.get("batch", 1), sizes["height"], sizes["width"]
        have = encoded.get(b)
        if have is not None and have.shape[2] >= h and have.shape[3] >= w:
            # a window of a real photo's latent is a real latent too, and costs no encoder pass
            # (at paper size each pass is ~10 s and gigabytes)
            top, left = (have.shape[2] - h) // 2, (have.shape[3] - w) // 2
            return {"latent_sample": np.ascontiguousarray(have[:, :, top:top + h, left:left + w])}
        x = sample_photos((h * f, w * f), b)
        with torch.no_grad():
            z = ae.encoder(x).numpy()
        if have is None or z.shape[2] * z.shape[3] > have.shape[2] * have.shape[3]:
            encoded[b] = z
        return {"latent_sample": z}

    # stage i of the decoder runs at latent size x f / 2**i, i.e. pixel size / 2**i
    stages = _evit_stages(ae.config.decoder_block_types, ae.config.decoder_layers_per_block,
                          ae.config.attention_head_dim, height, width, lambda i: 2**i)
    spec = GraphSpec(
        name="vae_decoder", module=VaeDecoderGraph(ae).eval(),
        inputs=[TensorSpec("latent_sample", "float32", ("batch", ae.config.latent_channels, "height", "width"))],
        outputs=[TensorSpec("sample", "float32", ("batch", ae.config.in_channels, f"height * {f}", f"width * {f}"))],
        example_inputs=examples, tolerances=IMAGE_TOLERANCES, fp16_keep_ops=AE_FP16_KEEP_OPS,
        attention_stages=stages, head_dim=ae.config.attention_head_dim, spatial_scale=f, meta={"spatial_compression": f})
    return spec


# ---------------------------------------------------------------------------------------------- denoiser
def transformer_spec(denoiser, recipe: dict | None = None, steps: int = 10) -> GraphSpec:
    """Examples are inputs recorded along the model's own sampler (its recipe, at most ``steps``
    steps; an adaptive ODE solver is replaced by fixed Heun steps, which visit the same states)."""
    from dcae_edge.sample import default_recipe, generate_latents
    from dcae_edge.schedules import with_solver

    cfg = denoiser.config
    c, s = cfg.in_channels, cfg.input_size
    recipe = recipe or default_recipe(denoiser)
    keep_variance = uses_learned_variance(denoiser, recipe)
    example_recipe = with_solver(recipe, "heun") if recipe["solver"]["name"] == "dopri5" else recipe
    cfg_scale = float(recipe.get("cfg_scale", 1.0)) if cfg.conditional else 1.0
    if cfg.conditional and cfg_scale == 1.0:
        cfg_scale = 3.0  # exercise the null class too

    def examples(sizes):  # exactly `batch` inputs recorded along a real sampling trajectory (CFG batch 2N)
        batch = sizes.get("batch", 2)
        n = (batch + 1) // 2 if cfg.conditional else batch
        record = []
        classes = [(7 * i) % cfg.num_classes for i in range(n)] if cfg.conditional else None
        with torch.no_grad():
            generate_latents(denoiser, classes, min(steps, int(recipe.get("steps", steps))), cfg_scale, seed=0, n=n,
                             record=record, recipe=example_recipe)
        picks = np.linspace(0, len(record) - 1, min(4, len(record))).round().astype(int)
        rows = [(picks[j % len(picks)], j) for j in range(batch)]  # row j from step picks[j % 4]: fixed shapes hold
        hs = torch.stack([record[i][0][j] for i, j in rows])
        ts = torch.stack([record[i][1][j] for i, j in rows])
        ys = torch.stack([record[i][2][j] for i, j in rows]) if cfg.conditional else torch.zeros(batch, dtype=torch.long)
        return {"hidden_states": hs.numpy(), "timestep": ts.numpy().astype(np.float32), "class_labels": ys.numpy().astype(np.int64)}

    out_c = 2 * c if keep_variance else c
    return GraphSpec(
        name="transformer", module=TransformerGraph(denoiser, keep_variance).eval(),
        inputs=[TensorSpec("hidden_states", "float32", ("batch", c, s, s)), TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("class_labels", "int64", ("batch",))],
        outputs=[TensorSpec("sample", "float32", ("batch", out_c, s, s))],
        example_inputs=examples, tolerances=TENSOR_TOLERANCES,
        fp16_keep_ops=("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Softmax", "Sin", "Cos", "Exp"),
        meta={"prediction": cfg.prediction, "num_classes": cfg.num_classes, "null_class": cfg.num_classes,
              "prediction_channels": c, "learned_variance": keep_variance})
