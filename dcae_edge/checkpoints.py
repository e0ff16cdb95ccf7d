"""Checkpoint I/O for DC-AE: our safetensors files, diffusers folders, efficientvit folders, hub ids.

Nothing here unpickles: every format read is safetensors + JSON.

Our format: one ``.safetensors`` file whose metadata holds ``{"format": "dcae-edge", "kind":
"autoencoder", "config": <DCAEConfig JSON>}``. Tensor names are ours: diffusers' tree, except that
the attention's q/k/v projections are one fused Linear ``to_qkv`` (rows: all q, then k, then v).
1x1-conv weights (efficientvit's qkv/proj) load into Linear layers by dropping their 1x1 dims.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .autoencoder import DCAE, DCAEConfig
from .presets import PRESETS, VARIANT_ALIASES, get_config

FORMAT = "dcae-edge"
BUNDLED_DIR = Path(__file__).parent / "weights"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Generic safetensors helpers
# ----------------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt, "
                              "download or copy it again") from None
    return tensors, metadata


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write next to the target, fsync, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a readable report of missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    state = {k: (v.flatten(1) if k in expected and v.dim() == 4 and expected[k].dim() == 2 and v.shape[2:] == (1, 1) else v)
             for k, v in state.items()}  # 1x1 conv <-> Linear
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in expected if k in state and state[k].shape != expected[k].shape)
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if nonfinite:
        raise CheckpointError(f"{source}: non-finite values (NaN/Inf) in {', '.join(nonfinite[:5])}"
                              + (f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else "")
                              + "; the checkpoint is corrupt (an fp16 overflow?): re-export it from the fp32 weights")
    if missing or unexpected or misshaped:
        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:15]) + (f"\n    ... and {len(items) - 15} more" if len(items) > 15 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}"
        raise CheckpointError(
            f"{source}: weights do not match the architecture"
            + block("missing keys", missing) + block("unexpected keys", unexpected) + block("mis-shaped keys", misshaped)
            + "\n  Check that the config (variant) matches the weights.")
    if any(v.is_meta for v in expected.values()):  # built with no storage (see skeleton): the tensors become the weights
        model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items() if k in state}, strict=False, assign=True)
        for k in optional - state.keys():  # e.g. BatchNorm's num_batches_tracked
            mod, _, leaf = k.rpartition(".")
            model.get_submodule(mod).register_buffer(leaf, torch.zeros((), dtype=expected[k].dtype))
        return
    for k, v in expected.items():
        if k in state:
            v.copy_(state[k].to(v.dtype))


# ----------------------------------------------------------------------------------------------
# Format conversions
# ----------------------------------------------------------------------------------------------
def diffusers_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, qkv = {}, {}
    for k, v in state.items():
        m = re.match(r"(.*\.attn)\.to_([qkv])\.weight$", k)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"attention {prefix} lacks one of to_q/to_k/to_v")
        out[f"{prefix}.to_qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.to_qkv.weight"):
            prefix = k[: -len(".to_qkv.weight")]
            for name, part in zip("qkv", v.flatten(1).chunk(3, dim=0)):
                out[f"{prefix}.to_{name}.weight"] = part.clone()
        else:
            out[k] = v
    return out


_EFFICIENTVIT_RULES = [  # ordered plain replacements (efficientvit -> our/diffusers tree)
    ("main.", ""), ("op_list.", ""), ("context_module.", "attn."), ("local_module.", "conv_out."),
    ("aggreg.0.0.", "to_qkv_multiscale.0.proj_in."), ("aggreg.0.1.", "to_qkv_multiscale.0.proj_out."),
    ("depth_conv.conv.", "conv_depth."), ("inverted_conv.conv.", "conv_inverted."),
    ("point_conv.conv.", "conv_point."), ("point_conv.norm.", "norm."), ("attn.qkv.conv.", "attn.to_qkv."),
    ("attn.proj.conv.", "attn.to_out."), ("attn.proj.norm.", "attn.norm_out."),
    ("conv1.conv.", "conv1."), ("conv2.conv.", "conv2."), ("conv2.norm.", "norm."), ("conv.conv.", "conv."),
    ("encoder.project_in.conv.", "encoder.conv_in."), ("encoder.project_out.0.conv.", "encoder.conv_out."),
    ("encoder.stages.", "encoder.down_blocks."), ("decoder.project_in.conv.", "decoder.conv_in."),
    ("decoder.project_out.0.", "decoder.norm_out."), ("decoder.project_out.2.conv.", "decoder.conv_out."),
    ("decoder.stages.", "decoder.up_blocks."),
]


def efficientvit_key(key: str, expected: set[str] | dict) -> str:
    """One efficientvit tensor name -> ours (``expected``: our model's state-dict names)."""
    new = key
    for a, b in _EFFICIENTVIT_RULES:
        new = new.replace(a, b)
    # in/mix stems are wrapped blocks (conv_in.conv / conv_out.conv); sana stems are plain convs
    for stem in ("encoder.conv_in.", "decoder.conv_out."):
        if new.startswith(stem) and new not in expected and new.replace(stem, stem + "conv.") in expected:
            new = new.replace(stem, stem + "conv.")
    return new


def efficientvit_to_ours(state: dict[str, torch.Tensor], model: DCAE) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    return {efficientvit_key(k, expected): v for k, v in state.items()}


def ours_to_efficientvit(state: dict, cfg) -> dict:
    """Our tensor names -> efficientvit's (dc_ae.py / ops.py layout, as in the released files)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if k.startswith("encoder.conv_in."):
            new = "encoder.project_in.conv." + ".".join(parts[2:])
            new = new.replace("project_in.conv.conv.", "project_in.conv.conv.")
        elif k.startswith("decoder.conv_out."):
            new = "decoder.project_out.op_list.2.conv." + ".".join(parts[2:])
        elif k.startswith("decoder.norm_out."):
            new = "decoder.project_out.op_list.0." + parts[-1]
        elif k.startswith("encoder.conv_out."):
            new = "encoder.project_out.main.op_list.0.conv." + parts[-1]
        elif k.startswith("decoder.conv_in."):
            new = "decoder.project_in.main.conv." + parts[-1]
        else:
            side, _, stage, op = parts[:4]
            rest = ".".join(parts[4:])
            rest = (rest.replace("attn.to_qkv_multiscale.0.proj_in.", "context_module.main.aggreg.0.0.")
                    .replace("attn.to_qkv_multiscale.0.proj_out.", "context_module.main.aggreg.0.1.")
                    .replace("attn.to_qkv.", "context_module.main.qkv.conv.")
                    .replace("attn.to_out.", "context_module.main.proj.conv.")
                    .replace("attn.norm_out.", "context_module.main.proj.norm.")
                    .replace("conv_out.conv_inverted.", "local_module.main.inverted_conv.conv.")
                    .replace("conv_out.conv_depth.", "local_module.main.depth_conv.conv.")
                    .replace("conv_out.conv_point.", "local_module.main.point_conv.conv.")
                    .replace("conv_out.norm.", "local_module.main.point_conv.norm."))
            if rest.startswith(("conv1.", "conv2.")):
                rest = rest[:6] + "conv." + rest[6:]
            elif rest.startswith("norm."):
                rest = "conv2.norm." + rest[5:]
            elif rest.startswith("conv."):  # down/up block: ConvPixel(Un)Shuffle wraps a ConvLayer
                rest = "conv.conv." + rest[5:] if cfg.downsample_block_type == "pixel_unshuffle" else rest
            if not rest.startswith(("context_module", "local_module")):
                rest = "main." + rest
            new = f"{side}.stages.{stage}.op_list.{op}.{rest}"
        out[new] = v
    return out


def looks_like_path(src: str) -> bool:
    """Strings that can only mean a local file or folder (never a hub id ``owner/name``)."""
    return (src.startswith((".", "/", "~")) or "\\" in src or src.count("/") != 1
            or src.endswith((".safetensors", ".json", ".onnx")))


# ----------------------------------------------------------------------------------------------
# Our own checkpoints
# ----------------------------------------------------------------------------------------------
def storage_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State dict for storage in ``dtype``: parameters are cast, buffers (BatchNorm statistics) and
    any tensor outside the dtype's range stay fp32 (a running variance of 1e5 is inf in fp16)."""
    params = {k for k, _ in model.named_parameters()}
    limit = torch.finfo(dtype).max if dtype.is_floating_point else None
    out = {}
    for k, v in model.state_dict().items():
        if not torch.isfinite(v).all() if v.is_floating_point() else False:
            raise ValueError(f"refusing to save {k}: it holds NaN or Inf")
        castable = v.is_floating_point() and k in params and (limit is None or v.abs().max() <= limit)
        out[k] = v.to(dtype) if castable else v
    return out


def save_autoencoder(model: DCAE, path: str | os.PathLike, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    """Save weights + config in one safetensors file (atomic). ``dtype=float16`` halves the size."""
    state = storage_state(model, dtype)
    metadata = {"format": FORMAT, "kind": "autoencoder", "config": json.dumps(model.config.to_dict())}
    for k, v in (extra or {}).items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v)
    atomic_save_safetensors(state, path, metadata)


def save_diffusers(model: DCAE, folder: str | os.PathLike) -> None:
    """Write a diffusers ``AutoencoderDC`` folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    if not cfg.pop("residual_autoencoding"):
        raise CheckpointError("diffusers' AutoencoderDC cannot express a model without residual shortcuts")
    cfg.pop("name")
    cfg["downsample_block_type"] = "pixel_unshuffle" if cfg["downsample_block_type"] == "pixel_unshuffle" else "Conv"
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderDC", **cfg}, indent=2))
    atomic_save_safetensors(ours_to_diffusers(model.state_dict()), folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})


def _hashable(v: torch.Tensor) -> np.ndarray:
    """A tensor's fp32 bytes as a buffer, without the copy ``tobytes`` makes (2.7 GB at paper size)."""
    return np.ascontiguousarray(v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).numpy()).reshape(-1)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's config and weights (fp32): ties latent caches, denoisers, bundles
    and reference files to the exact weights that produced them."""
    import hashlib

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(_hashable(v))
    return h.hexdigest()[:16]


autoencoder_fingerprint = model_fingerprint


def latent_fingerprint(model: DCAE) -> str:
    """Identity of an autoencoder's latent space: encoder weights and config. A denoiser stays
    valid when only the decoder changes (more decoder training); it records its own scaling factor."""
    import hashlib

    cfg = model.config.to_dict()
    keys = [k for k in cfg if not k.startswith("decoder_") and k not in ("name", "scaling_factor")]
    h = hashlib.sha256(json.dumps({k: cfg[k] for k in sorted(keys)}, sort_keys=True).encode())
    for k, v in sorted(model.encoder.state_dict().items()):
        h.update(k.encode())
        h.update(_hashable(v))
    return h.hexdigest()[:16]


def latents_match(ae: DCAE, meta: dict) -> bool:
    """Whether latents recorded in ``meta`` (a cache or denoiser) came from ``ae``'s latent space.
    Older files carry only the whole-model fingerprint."""
    if meta.get("latent_fingerprint"):
        return meta["latent_fingerprint"] == latent_fingerprint(ae)
    return meta.get("autoencoder_fingerprint") in (None, model_fingerprint(ae))


# ----------------------------------------------------------------------------------------------
# load_autoencoder
# ----------------------------------------------------------------------------------------------
def bundled_weights_path(name: str) -> Path | None:
    key = VARIANT_ALIASES.get(name, name)
    path = BUNDLED_DIR / f"{key}.safetensors"
    return path if path.is_file() else None


def build_autoencoder(name_or_config: str | DCAEConfig | dict) -> DCAE:
    """Randomly initialised DC-AE of a preset name or config."""
    if isinstance(name_or_config, DCAEConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = DCAEConfig.from_dict(name_or_config)
    else:
        cfg = get_config(name_or_config)
    return DCAE(cfg).eval()


def skeleton(cfg: DCAEConfig) -> DCAE:
    """The architecture without storage, for loading: the checkpoint's tensors become its weights
    (no random init that the checkpoint overwrites: ~10 s and a second copy of the weights at paper size)."""
    with torch.device("meta"):
        return DCAE(cfg)


def _load_ours(path: Path) -> DCAE:
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT or metadata.get("kind", "autoencoder") != "autoencoder":
        raise CheckpointError(f"{path}: not a dcae-edge autoencoder checkpoint (no dcae-edge config in its metadata). "
                              "For diffusers or efficientvit weights pass the folder that holds config.json.")
    model = skeleton(DCAEConfig.from_dict(json.loads(metadata["config"])))
    load_state_dict_strict(model, tensors, str(path))
    return model.eval()


def _load_diffusers(folder: Path, cfg: dict) -> DCAE:
    known = {k: v for k, v in cfg.items() if not k.startswith("_")}
    ds = known.get("downsample_block_type", "pixel_unshuffle")
    known["downsample_block_type"] = "pixel_unshuffle" if ds == "pixel_unshuffle" else "conv"
    us = known.get("upsample_block_type", "pixel_shuffle")
    known["upsample_block_type"] = "interpolate" if us == "interpolate" else "pixel_shuffle"
    defaults = DCAEConfig()
    n = len(known.get("encoder_block_out_channels", defaults.encoder_block_out_channels))
    for key in ("encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns"):
        if isinstance(known.get(key), str):
            known[key] = (known[key],) * n
    known.setdefault("name", folder.name)
    model = skeleton(DCAEConfig.from_dict(known))
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors, _ = read_safetensors(weights)
    load_state_dict_strict(model, diffusers_to_ours(tensors), str(weights))
    return model.eval()


def _load_efficientvit(folder: Path, cfg: dict) -> DCAE:
    name = cfg["model_name"]
    try:
        model = skeleton(get_config(name))
    except KeyError:
        raise CheckpointError(f"{folder}: efficientvit model_name {name!r} is not a published DC-AE; "
                              f"known: {', '.join(sorted(PRESETS))}") from None
    weights = folder / "model.safetensors"
    tensors, _ = read_safetensors(weights)
    load_state_dict_strict(model, efficientvit_to_ours(tensors, model), str(weights))
    return model.eval()


def _load_folder(folder: Path) -> DCAE:
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        if cfg.get("_class_name") == "AutoencoderDC" and (folder / "diffusion_pytorch_model.safetensors").is_file():
            return _load_diffusers(folder, cfg)
        if "model_name" in cfg and (folder / "model.safetensors").is_file():
            return _load_efficientvit(folder, cfg)
        if cfg.get("_class_name") == "AutoencoderDC":
            raise CheckpointError(f"{folder}: diffusers config found but diffusion_pytorch_model.safetensors is missing "
                                  "(only safetensors weights are read; .bin pickles are refused)")
        if "model_name" in cfg:
            raise CheckpointError(f"{folder}: efficientvit config found but model.safetensors is missing")
    ours = sorted(folder.glob("*.safetensors"))
    if len(ours) == 1 and not cfg_path.is_file():
        return _load_ours(ours[0])
    raise CheckpointError(
        f"{folder}: neither a diffusers AutoencoderDC folder (config.json with _class_name AutoencoderDC + "
        "diffusion_pytorch_model.safetensors) nor an efficientvit folder (config.json with model_name + "
        "model.safetensors) nor a dcae-edge checkpoint (.safetensors)")


def _load_hub(repo_id: str) -> DCAE:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    if snapshot_download is not None:
        try:
            folder = snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors"])
            return _load_folder(Path(folder))
        except CheckpointError:
            raise
        except Exception as e:  # offline, unknown repo, auth ... -> one actionable message
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        reason = "huggingface_hub is not installed"
    raise CheckpointError(
        f"cannot fetch {repo_id!r} from the model hub ({reason}).\n"
        f"  Download https://huggingface.co/{repo_id} (config.json and the .safetensors file) on a machine with "
        "network access, copy the folder here, and pass its path instead of the hub id.")


def load_autoencoder(source: str | os.PathLike = "f64", *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> DCAE:
    """Load a DC-AE in eval mode.

    ``source`` is one of: a short variant (``f32``/``f64``/``f128``: our bundled edge weights), a
    ``.safetensors`` file of ours, a diffusers folder, an efficientvit folder, a model-hub id
    (``mit-han-lab/dc-ae-f64c128-in-1.0-diffusers``, needs huggingface_hub and network), or
    ``random:<preset>`` for a randomly initialised model.
    """
    src = str(source)
    if src.startswith("random:"):
        model = build_autoencoder(src.split(":", 1)[1])
    elif Path(src).is_dir():
        model = _load_folder(Path(src))
    elif Path(src).is_file():
        if Path(src).suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            raise CheckpointError(f"{src}: pickle checkpoints are refused (unpickling runs arbitrary code); "
                                  "convert it to safetensors where you trust it")
        model = _load_ours(Path(src))
    elif src in VARIANT_ALIASES or src in PRESETS:
        path = bundled_weights_path(src)
        if path is None:
            raise CheckpointError(
                f"no bundled weights for {src!r}. Bundled: {', '.join(p.stem for p in BUNDLED_DIR.glob('*.safetensors')) or 'none'}. "
                f"Pass a checkpoint path, a hub id, or 'random:{src}' for random weights.")
        model = _load_ours(path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not looks_like_path(src):
        model = _load_hub(src)
    elif looks_like_path(src):
        raise CheckpointError(f"{src}: no such file or folder")
    else:
        raise CheckpointError(f"{src!r} is neither a file, a folder, a known variant ({', '.join(VARIANT_ALIASES)}), "
                              "nor a hub id (owner/name)")
    return model.to(device=device, dtype=dtype).eval()
