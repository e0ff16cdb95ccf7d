"""The released DC-AE ImageNet-512 generators (mit-han-lab) loaded exactly, with their samplers.

    from dcae_edge import load_diffusion_model
    m = load_diffusion_model("path/to/dc-ae-f64c128-in-1.0-uvit-h-in-512px")   # folder, or a hub id with [hub]
    m.autoencoder, m.denoiser, m.recipe, m.class_names

A released folder holds ``config.json`` = ``{"model_name": NAME}`` and one fp32
``model.safetensors`` with ``autoencoder.*`` (the DC-AE, efficientvit layout) and
``diffusion_model.*`` (the U-ViT or DiT). The architecture is not stored: it follows from NAME
(table below, from efficientvit's model zoo). The recipe is how the authors sampled for their
published FIDs (efficientvit ``uvit.py`` / ``dit.py`` ``generate``; ``schedules`` explains each
field); it goes into every exported bundle's manifest.

Our own denoiser checkpoints load through the same call (their autoencoder from their metadata).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import CheckpointError, efficientvit_key, looks_like_path
from .classes import imagenet_class_names, resolve_classes  # noqa: F401 (re-exported)
from .denoiser import Denoiser, DenoiserConfig
from .presets import get_config

UVIT_DPM = {"kind": "vp", "betas": {"schedule": "scaled_linear", "start": 0.00085, "end": 0.012, "num_train_timesteps": 1000},
            "prediction": "eps", "timestep": {"type": "continuous", "offset": 0},
            "solver": {"name": "dpm_solver++", "method": "singlestep", "order": 3, "skip_type": "time_uniform",
                       "t_end": 0.001, "solver_type": "dpm_solver"},
            "steps": 30, "cfg_scale": 1.5,
            "source": "efficientvit diffusioncore/models/uvit.py generate: DPM_Solver(predict_x0=True).sample(steps=30, "
                      "eps=1/1000, T=1; order 3, time_uniform, method fast), model time = t * 1000"}
USIT_ODE = {"kind": "flow", "time": "data_level", "timestep_scale": 1.0,
            "solver": {"name": "dopri5", "atol": 1e-6, "rtol": 1e-3}, "steps": 50, "cfg_scale": 1.2,
            "source": "efficientvit sit_sampler: Linear path x_t = t data + (1 - t) noise, velocity, torchdiffeq dopri5 "
                      "atol 1e-6 rtol 1e-3 from t=0 (noise) to 1; steps applies only to fixed-step solvers"}
DIT_ADM = {"kind": "vp", "betas": {"schedule": "linear", "start": 0.0001, "end": 0.02, "num_train_timesteps": 1000},
           "prediction": "eps", "timestep": {"type": "index", "offset": 0},
           "solver": {"name": "adm", "variance": "learned_range"}, "steps": 250, "cfg_scale": 1.3,
           "source": "efficientvit diffusioncore/models/dit.py generate: ADM create_diffusion('250'), p_sample_loop, "
                     "clip_denoised False, CFG on the eps channels"}

# name -> (backbone, depth, hidden, heads, autoencoder, recipe, cfg scale, trainable parameters at f32c32)
_SIZES = {"s": (12, 512, 8), "h": (28, 1152, 16), "2b": (28, 2048, 32), "xl": (28, 1152, 16)}


@dataclass(frozen=True)
class Release:
    backbone: str                 # "uvit" | "dit"
    depth: int
    hidden: int
    heads: int
    autoencoder: str              # a preset name (dcae_edge.presets) or a DCAEConfig dict (tests)
    recipe: dict
    latent_channels: int
    input_size: int               # latent side at 512 px
    scaling_factor: float
    parameters: int | None = None  # trainable denoiser parameters, checked to the unit when known


RELEASES: dict[str, Release] = {}


def register_release(name: str, release: Release) -> None:
    """Add an entry (tests register tiny ones; a new upstream release is one line)."""
    RELEASES[name] = release


def _register_zoo() -> None:
    aes = {"f32c32": ("dc-ae-f32c32-in-1.0", 32, 16, 0.3189), "f64c128": ("dc-ae-f64c128-in-1.0", 128, 8, 0.2889)}
    # parameters per efficientvit's README (UViT f32 rows recomputed from the code to the unit; DiT-XL trainable only)
    table = [("f32c32", "uvit-s", UVIT_DPM, 1.5, 44_788_768), ("f32c32", "uvit-h", UVIT_DPM, 1.5, 500_868_896),
             ("f64c128", "uvit-h", UVIT_DPM, 1.5, 500_868_992), ("f32c32", "uvit-2b", UVIT_DPM, 1.5, 1_580_396_576),
             ("f64c128", "uvit-2b", UVIT_DPM, 1.5, 1_580_396_672), ("f32c32", "usit-h", USIT_ODE, 1.2, 500_868_896),
             ("f32c32", "usit-2b", USIT_ODE, 1.15, 1_580_396_576), ("f32c32", "dit-xl", DIT_ADM, 1.3, 674_890_048)]
    for ae, model, recipe, cfg, params in table:
        ae_name, c, s, sf = aes[ae]
        backbone = "dit" if model.startswith("dit") else "uvit"
        depth, hidden, heads = _SIZES[model.split("-")[1]]
        rel = Release(backbone, depth, hidden, heads, ae_name, {**recipe, "cfg_scale": cfg}, c, s, sf, params)
        base = f"dc-ae-{ae}-in-1.0-{model}-in-512px"
        register_release(base, rel)
        if ae == "f64c128" and model.startswith("uvit"):
            register_release(base + "-train2000k", rel)
        if model == "dit-xl":  # the README's "cfg 1.5 for all other models" [unverified for this one]
            register_release(base + "-trainbs1024", Release(**{**rel.__dict__, "recipe": {**rel.recipe, "cfg_scale": 1.5}}))


_register_zoo()


def release_denoiser_config(name: str, rel: Release) -> DenoiserConfig:
    return DenoiserConfig(arch=rel.backbone, input_size=rel.input_size, in_channels=rel.latent_channels, patch_size=1,
                          hidden_size=rel.hidden, depth=rel.depth, num_heads=rel.heads, num_classes=1000,
                          class_dropout_prob=0.1, learn_sigma=rel.backbone == "dit", qkv_bias=rel.backbone == "dit",
                          prediction="flow" if rel.recipe["kind"] == "flow" else "eps", name=name)


@dataclass
class DiffusionModel:
    name: str
    autoencoder: torch.nn.Module
    denoiser: Denoiser
    recipe: dict
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.recipe["latent_scaling_factor"])


# ---------------------------------------------------------------------------------------------- loading
def _read_release_folder(folder: Path) -> tuple[str, Path]:
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (a released DC-AE generator folder holds config.json and "
                              "model.safetensors)")
    try:
        name = json.loads(cfg_path.read_text()).get("model_name")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not name:
        raise CheckpointError(f"{cfg_path}: no model_name (expected {{\"model_name\": \"dc-ae-...-in-512px\"}})")
    if not weights.is_file():
        raise CheckpointError(f"{folder}: model.safetensors is missing (only safetensors are read; pickles are refused)")
    return name, weights


def _streamed_state(path: Path, prefix: str, expected: dict[str, torch.Tensor], rename=lambda k: k) -> dict:
    """Tensors under ``prefix`` (renamed), checked against ``expected`` names and shapes *before*
    anything is read: a wrong file fails in a second, not after loading gigabytes."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    with f:
        names = {rename(k[len(prefix):]): k for k in f.keys() if k.startswith(prefix)}
        shapes = {n: tuple(f.get_slice(k).get_shape()) for n, k in names.items()}
        missing = sorted(k for k in expected if k not in names and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in names if k not in expected)
        misshaped = sorted(f"{k}: file {shapes[k]} vs model {tuple(expected[k].shape)}" for k in names
                           if k in expected and shapes[k] != tuple(expected[k].shape)
                           and not (len(shapes[k]) == 4 and shapes[k][2:] == (1, 1) and shapes[k][:2] == tuple(expected[k].shape)))
        if missing or unexpected or misshaped:
            def block(title, items):
                if not items:
                    return ""
                return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:12]) + (f"\n    ... and {len(items) - 12} more" if len(items) > 12 else "")
            raise CheckpointError(f"{path}: {prefix or 'the'} weights do not match the architecture"
                                  + block("missing keys", missing) + block("unexpected keys", unexpected)
                                  + block("mis-shaped keys", misshaped))
        state = {}
        for n, k in names.items():
            t = f.get_tensor(k)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: {k} holds NaN/Inf; the file is corrupt")
            state[n] = t.reshape(expected[n].shape).to(expected[n].dtype if expected[n].is_floating_point() else t.dtype)
        return state


def _build(make, meta: bool):
    if not meta:
        return make()
    with torch.device("meta"):
        return make()


def write_release_folder(folder: str | os.PathLike, name: str, ae, denoiser: Denoiser) -> Path:
    """Write a generator exactly as the model hub stores the released ones: config.json holding only
    model_name, one fp32 model.safetensors with autoencoder.* (efficientvit names) and
    diffusion_model.* (plain module names). For tests and benchmarks with random weights."""
    from safetensors.torch import save_file

    from .checkpoints import ours_to_efficientvit

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_name": name}, indent=2))
    state = {"autoencoder." + k: v.float() for k, v in ours_to_efficientvit(ae.state_dict(), ae.config).items()
             if not k.endswith("num_batches_tracked")}
    state.update({"diffusion_model." + k[len("net."):]: v.float() for k, v in denoiser.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def load_release(folder: str | os.PathLike, name: str | None = None, device: str = "cpu") -> DiffusionModel:
    folder = Path(folder)
    file_name, weights = _read_release_folder(folder)
    name = name or file_name
    if name not in RELEASES:
        known = "\n  ".join(sorted(RELEASES))
        hint = " (is it an autoencoder? use load_autoencoder)" if re.fullmatch(r"dc-ae-f\d+c\d+-(in|mix|sana)-[\d.]+", name) else ""
        raise CheckpointError(f"{folder}: model_name {name!r} is not a known DC-AE generator release{hint}. Known:\n  {known}")
    rel = RELEASES[name]
    from .autoencoder import DCAE, DCAEConfig

    ae_cfg = DCAEConfig.from_dict(rel.autoencoder) if isinstance(rel.autoencoder, dict) else get_config(rel.autoencoder)
    ae_cfg.scaling_factor = rel.scaling_factor
    dn_cfg = release_denoiser_config(name, rel)
    # build without allocating or initialising (meta), then adopt the file's tensors: peak RAM ~ one copy
    ae = _build(lambda: DCAE(ae_cfg), meta=True)
    dn = _build(lambda: Denoiser(dn_cfg), meta=True)
    ae_expected = ae.state_dict()
    ae_state = _streamed_state(weights, "autoencoder.", ae_expected, rename=lambda k: efficientvit_key(k, ae_expected))
    dn_expected = {k[len("net."):]: v for k, v in dn.state_dict().items()}
    try:
        dn_state = _streamed_state(weights, "diffusion_model.", dn_expected)
    except CheckpointError as e:
        other = "dit" if rel.backbone == "uvit" else "uvit"
        hint = (f"\n  The file looks like a {other.upper()} (keys such as "
                f"{'blocks.0.adaLN_modulation' if other == 'dit' else 'in_blocks.0.attn.qkv'}), but {name!r} is a "
                f"{rel.backbone.upper()} release: is config.json's model_name right?")
        msg = str(e)
        raise CheckpointError(msg + (hint if ("adaLN" in msg or "in_blocks" in msg) else "")) from None
    for k, v in ae_expected.items():  # buffers that checkpoints do not hold (BatchNorm step counters)
        if k not in ae_state:
            ae_state[k] = torch.zeros(v.shape, dtype=v.dtype)
    ae.load_state_dict(ae_state, strict=True, assign=True)
    dn.load_state_dict({"net." + k: v for k, v in dn_state.items()}, strict=True, assign=True)
    params = sum(p.numel() for p in dn.parameters())
    if rel.parameters is not None and params != rel.parameters:
        raise CheckpointError(f"{name}: {params:,} denoiser parameters, the release has {rel.parameters:,}")
    recipe = {**rel.recipe, "null_class": 1000, "num_classes": 1000, "cfg_channels": rel.latent_channels,
              "latent_scaling_factor": rel.scaling_factor, "latent_shape": [rel.latent_channels, rel.input_size, rel.input_size]}
    names = imagenet_class_names() if dn_cfg.num_classes == 1000 else [str(i) for i in range(dn_cfg.num_classes)]
    return DiffusionModel(name, ae.to(device).eval(), dn.to(device).eval(), recipe, names, str(folder))


def load_ours(path: str | os.PathLike, device: str = "cpu") -> DiffusionModel:
    """A denoiser checkpoint of ours + the autoencoder named in its metadata (checked by fingerprint)."""
    from .checkpoints import latents_match, load_autoencoder
    from .denoiser import load_denoiser
    from .schedules import recipe_ours

    dn, meta = load_denoiser(path)
    source = meta.get("autoencoder_source", "f64")
    ae = load_autoencoder(source if not Path(str(source)).is_absolute() or Path(str(source)).exists() else "f64")
    if not latents_match(ae, meta):
        raise CheckpointError(f"{path}: trained on the latents of another autoencoder ({source}); load that one")
    cfg = dn.config
    recipe = meta.get("recipe") or recipe_ours(cfg.prediction)
    recipe = {**recipe, "null_class": cfg.num_classes, "num_classes": cfg.num_classes, "cfg_channels": cfg.in_channels,
              "latent_scaling_factor": float(meta.get("latent_scaling_factor", ae.scaling_factor)),
              "latent_shape": [cfg.in_channels, cfg.input_size, cfg.input_size]}
    return DiffusionModel(cfg.name, ae.to(device).eval(), dn.to(device).eval(), recipe, list(meta.get("class_names") or []),
                          str(path))


def load_diffusion_model(source: str | os.PathLike, device: str = "cpu") -> DiffusionModel:
    """A released generator folder, a hub id (``mit-han-lab/dc-ae-...-in-512px``, needs ``[hub]``
    and network), or a denoiser checkpoint of ours."""
    src = str(source)
    p = Path(src)
    if p.is_dir():
        return load_release(p, device=device)
    if p.is_file():
        return load_ours(p, device)
    if looks_like_path(src):
        raise CheckpointError(f"{src}: no such file or folder")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{src} looks like a hub id, but huggingface_hub is not installed: "
                                  "pip install 'dcae-edge[hub]', or download the folder and pass its path") from None
        try:
            folder = snapshot_download(src, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:  # offline, unknown repo, auth ... -> one actionable message
            raise CheckpointError(f"cannot fetch {src!r} from the model hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
                                  f"  Download https://huggingface.co/{src} (config.json, model.safetensors) where there is "
                                  "network access and pass the folder instead.") from None
        return load_release(Path(folder), device=device)
    raise CheckpointError(f"{src}: no such file or folder, and not a hub id (owner/name)")
