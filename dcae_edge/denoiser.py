"""Latent diffusion transformers for DC-AE latents: DiT (adaLN-Zero) and U-ViT (long skips,
time and class tokens), patch size 1 by default, class-conditional with a learned null class
for classifier-free guidance, or unconditional.

Both take ``(hidden_states B x C x H x W, timestep B float in [0, 1000], class_labels B int64)``
and return a prediction shaped like ``hidden_states`` (DiT with ``learn_sigma`` returns 2C
channels; the first C are the prediction). Parameter counts of the paper presets match the
efficientvit model zoo for f32c32 latents at 512px (16x16x32): UViT-S 44.79M, UViT-H 500.87M,
UViT-2B 1580.40M, DiT-XL 674.89M (DiT's fixed sin-cos position table is a buffer, not counted).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TIMESTEP_MAX = 1000.0


@dataclass
class DenoiserConfig:
    arch: str = "dit"               # "dit" | "uvit"
    input_size: int = 8             # latent height = width
    in_channels: int = 128
    patch_size: int = 1
    hidden_size: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0            # 0 = unconditional; id num_classes is the learned null class
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False       # DiT only: also output a variance (2C channels)
    qkv_bias: bool = True           # DiT: True, U-ViT: False
    prediction: str = "flow"        # "flow" (velocity, rectified flow) | "eps" (DDPM noise)
    flow_skip: bool = False         # flow: output = network + c(t) * input, the best linear guess of the velocity
    label_every_token: bool = False  # U-ViT: also add the class embedding to every patch token (released UViTs: off)
    class_prior: bool = False       # flow_skip + a learned mean latent per class: output also adds -s(t) * mean[class]
    name: str = "custom"

    def __post_init__(self):
        if self.arch not in ("dit", "uvit"):
            raise ValueError(f"arch must be 'dit' or 'uvit', got {self.arch!r}")
        if self.prediction not in ("flow", "eps"):
            raise ValueError(f"prediction must be 'flow' or 'eps', got {self.prediction!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.learn_sigma and self.arch != "dit":
            raise ValueError("learn_sigma is a DiT option")
        if self.flow_skip and (self.prediction != "flow" or self.learn_sigma):
            raise ValueError("flow_skip is for flow prediction without learned variance")
        if self.class_prior and not (self.flow_skip and self.num_classes):
            raise ValueError("class_prior needs flow_skip and a class-conditional denoiser")
        if self.label_every_token and (self.arch != "uvit" or not self.num_classes):
            raise ValueError("label_every_token is for a class-conditional U-ViT")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] (DiT / U-ViT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def sincos_2d(dim: int, grid: int, legacy: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid*grid, dim), as in MAE / DiT: the first half of the
    channels encodes the column (x), the second the row. ``legacy``: the swapped halves that our
    DiTs saved before 0.2 were trained with (their checkpoints hold no table)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="xy")
    halves = [one_d(dim // 2, cols), one_d(dim // 2, rows)]
    emb = np.concatenate(halves[::-1] if legacy else halves, axis=1)
    return torch.from_numpy(emb).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    # softmax(q k^T / sqrt(d)) v, a method so that an exporter can trace an equivalent form (export.graph_forms)
    attend = staticmethod(F.scaled_dot_product_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = self.attend(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Conv patchifier (timm's ``PatchEmbed``: the released checkpoints name it ``*.proj``)."""

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the learned null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------------------------- DiT
class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiT(nn.Module):
    """facebookresearch/DiT with the released checkpoints' module names. The fixed 2-D sin-cos
    position table is a (saved) buffer, not a parameter: parameter counts are trainable ones."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d) if cfg.conditional else None
        self.register_buffer("pos_embed", sincos_2d(d, cfg.input_size // p)[None])
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, p * p * cfg.out_channels)
        self.initialize()

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden_states, timestep, class_labels=None):
        cfg = self.config
        b, _, h, w = hidden_states.shape
        x = self.x_embedder(hidden_states) + self.pos_embed
        c = self.t_embedder(timestep)
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_labels)
        for blk in self.blocks:
            x = blk(x, c)
        return unpatchify(self.final_layer(x, c), cfg.patch_size, cfg.out_channels, h, w)


# ---------------------------------------------------------------------------------------------- U-ViT
class UViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT as in efficientvit's diffusioncore (the released DC-AE generators): tokens [label,
    time, patches] + learned positions, the time token is the raw sinusoid (no MLP), depth/2 in-
    blocks, a mid-block and depth/2 out-blocks joined by long skips (concat -> Linear)."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.in_channels, d, p)
        self.label_emb = LabelEmbedder(cfg.num_classes, d) if cfg.conditional else None
        self.extras = 2 if cfg.conditional else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (cfg.input_size // p) ** 2, d))
        blk = lambda skip=False: UViTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, skip)  # noqa: E731
        self.in_blocks = nn.ModuleList(blk() for _ in range(cfg.depth // 2))
        self.mid_block = blk()
        self.out_blocks = nn.ModuleList(blk(skip=True) for _ in range(cfg.depth // 2))
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, p * p * cfg.in_channels)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None

    def forward(self, hidden_states, timestep, class_labels=None):
        cfg = self.config
        b, _, h, w = hidden_states.shape
        x = self.patch_embed(hidden_states)
        if cfg.label_every_token:  # a small model reads one label token slowly; every token then carries it
            x = x + self.label_emb(class_labels)[:, None]
        tokens = [timestep_embedding(timestep, cfg.hidden_size)[:, None].to(x.dtype), x]
        if self.label_emb is not None:
            tokens.insert(0, self.label_emb(class_labels)[:, None])
        x = torch.cat(tokens, dim=1) + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        return unpatchify(x, cfg.patch_size, cfg.in_channels, h, w)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class Denoiser(nn.Module):
    """DiT or U-ViT behind one interface, with input checks for the public call."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.config = cfg
        self.net = DiT(cfg) if cfg.arch == "dit" else UViT(cfg)
        if cfg.class_prior:  # row num_classes: the null class (the mean of all data); the trainer sets them from data
            self.class_means = nn.Parameter(torch.zeros(cfg.num_classes + 1, cfg.in_channels, cfg.input_size, cfg.input_size))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def check_inputs(self, hidden_states, timestep, class_labels=None, allow_null: bool = True) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if hidden_states.dim() != 4 or tuple(hidden_states.shape[1:]) != want:
            raise ValueError(f"latents must be B x {want[0]} x {want[1]} x {want[2]} for this denoiser, "
                             f"got {tuple(hidden_states.shape)}; was the cache made with another autoencoder or resolution?")
        t = torch.as_tensor(timestep)
        if t.numel() and (t.min() < 0 or t.max() > TIMESTEP_MAX):
            raise ValueError(f"timestep must lie in [0, {TIMESTEP_MAX:g}], got [{t.min().item():g}, {t.max().item():g}]")
        if cfg.conditional:
            if class_labels is None:
                raise ValueError("this denoiser is class-conditional: pass class_labels (use the null class "
                                 f"{cfg.num_classes} for unconditional samples)")
            hi = cfg.num_classes if allow_null else cfg.num_classes - 1
            if class_labels.min() < 0 or class_labels.max() > hi:
                raise ValueError(f"class ids must lie in [0, {hi}] (null class = {cfg.num_classes}), "
                                 f"got [{class_labels.min().item()}, {class_labels.max().item()}]")
        elif class_labels is not None and class_labels.numel() and (class_labels != 0).any():
            raise ValueError("this denoiser is unconditional: class labels are not accepted")

    def forward(self, hidden_states, timestep, class_labels=None):
        if class_labels is None and self.config.conditional:
            class_labels = torch.full((hidden_states.shape[0],), self.null_class, dtype=torch.long,
                                      device=hidden_states.device)
        out = self.net(hidden_states, timestep, class_labels)
        if self.config.flow_skip:
            out = out + flow_skip_scale(timestep, hidden_states)
        if self.config.class_prior:
            out = out - class_prior_scale(timestep, out) * self.class_means[class_labels].to(out.dtype)
        return out


def flow_skip_scale(timestep, x: torch.Tensor) -> torch.Tensor:
    """c(t) * x_t with c(t) = (2t - 1) / ((1 - t)^2 + t^2): the linear least-squares velocity for unit-
    variance data, -x at t = 0 and +x at t = 1 (EDM's c_skip for rectified flow). Without it the network
    must carry its input through to its output at both ends, which a small transformer with a final
    LayerNorm learns slowly (the digit runs: worse than the class mean at t = 1 after 3,000 steps)."""
    t = (torch.as_tensor(timestep, dtype=torch.float32, device=x.device) / TIMESTEP_MAX).reshape(-1, 1, 1, 1)
    return ((2 * t - 1) / ((1 - t) ** 2 + t ** 2)).to(x.dtype) * x


def class_prior_scale(timestep, like: torch.Tensor) -> torch.Tensor:
    """s(t) = t / ((1 - t)^2 + t^2): with flow_skip, c(t) * x_t - s(t) * mean[class] is the exact velocity
    E[noise - x0 | x_t, class] when each class is Gaussian around its mean with unit variance. At t = 1
    (pure noise) it is x_t - mean[class]: what a network reading only noise and a label must otherwise
    learn to output by ignoring its input (the digit runs: still worse than the class mean after
    3,000 steps, for U-ViT and DiT alike). The network then learns the residual from there."""
    t = (torch.as_tensor(timestep, dtype=torch.float32, device=like.device) / TIMESTEP_MAX).reshape(-1, 1, 1, 1)
    return (t / ((1 - t) ** 2 + t ** 2)).to(like.dtype)


# ---------------------------------------------------------------------------------------------- presets
def _paper(arch, hidden, depth, heads, name, **kw) -> DenoiserConfig:
    base = dict(input_size=16, in_channels=32, patch_size=1, num_classes=1000)
    base.update(kw)
    return DenoiserConfig(arch=arch, hidden_size=hidden, depth=depth, num_heads=heads, name=name, **base)


DENOISER_PRESETS = {
    # efficientvit model zoo (ImageNet 512px, f32c32 latents 16x16x32, eps-prediction)
    "uvit-s": lambda **kw: _paper("uvit", 512, 12, 8, "uvit-s", qkv_bias=False, prediction="eps", **kw),
    "uvit-h": lambda **kw: _paper("uvit", 1152, 28, 16, "uvit-h", qkv_bias=False, prediction="eps", **kw),
    "uvit-2b": lambda **kw: _paper("uvit", 2048, 28, 32, "uvit-2b", qkv_bias=False, prediction="eps", **kw),
    "dit-xl": lambda **kw: _paper("dit", 1152, 28, 16, "dit-xl", learn_sigma=True, prediction="eps", **kw),
    # CPU-trainable
    "dit-tiny": lambda **kw: DenoiserConfig(**{**dict(arch="dit", hidden_size=256, depth=6, num_heads=4, name="dit-tiny"), **kw}),
    "uvit-tiny": lambda **kw: DenoiserConfig(**{**dict(arch="uvit", hidden_size=256, depth=6, num_heads=4, qkv_bias=False,
                                                       name="uvit-tiny"), **kw}),
}


def build_denoiser(name_or_config: str | DenoiserConfig | dict, **overrides) -> Denoiser:
    if isinstance(name_or_config, DenoiserConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = DenoiserConfig.from_dict({**name_or_config, **overrides})
    else:
        if name_or_config not in DENOISER_PRESETS:
            raise KeyError(f"unknown denoiser preset {name_or_config!r}; known: {', '.join(DENOISER_PRESETS)}")
        cfg = DENOISER_PRESETS[name_or_config](**overrides)
    return Denoiser(cfg)


def save_denoiser(model: Denoiser, path, extra: dict | None = None, dtype=torch.float32) -> None:
    from .checkpoints import FORMAT, atomic_save_safetensors

    from .checkpoints import storage_state

    state = storage_state(model, dtype)
    metadata = {"format": FORMAT, "kind": "denoiser", "config": json.dumps(model.config.to_dict())}
    for k, v in (extra or {}).items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v)
    atomic_save_safetensors(state, path, metadata)


# module names before 0.2 (our own checkpoints) -> the released checkpoints' names used now
_LEGACY_NAMES = [("x_embedder.weight", "x_embedder.proj.weight"), ("x_embedder.bias", "x_embedder.proj.bias"),
                 ("patch_embed.weight", "patch_embed.proj.weight"), ("patch_embed.bias", "patch_embed.proj.bias"),
                 ("t_embedder.0.", "t_embedder.mlp.0."), ("t_embedder.2.", "t_embedder.mlp.2."),
                 ("y_embedder.weight", "y_embedder.embedding_table.weight"),
                 ("label_emb.weight", "label_emb.embedding_table.weight"),
                 ("final_linear.", "final_layer.linear."), ("final_adaLN.1.", "final_layer.adaLN_modulation.1.")]


def upgrade_legacy_state(state: dict[str, torch.Tensor], cfg: DenoiserConfig) -> dict[str, torch.Tensor]:
    """Rename pre-0.2 keys; a DiT saved without its position table gets the one it was trained with."""
    out = {}
    for k, v in state.items():
        for old, new in _LEGACY_NAMES:
            if k.startswith("net." + old):
                k = "net." + new + k[len("net." + old):]
                break
        out[k] = v
    if cfg.arch == "dit" and "net.pos_embed" not in out and "net.x_embedder.weight" in state:
        out["net.pos_embed"] = sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size, legacy=True)[None]
    return out


def load_denoiser(path) -> tuple[Denoiser, dict]:
    """Load a denoiser of ours; returns (model in eval mode, metadata incl. the autoencoder it was trained for)."""
    from .checkpoints import FORMAT, CheckpointError, load_state_dict_strict, read_safetensors

    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT or metadata.get("kind") != "denoiser":
        raise CheckpointError(f"{path}: not a dcae-edge denoiser checkpoint")
    model = Denoiser(DenoiserConfig.from_dict(json.loads(metadata["config"])))
    load_state_dict_strict(model, upgrade_legacy_state(tensors, model.config), str(path))
    meta = {k: (json.loads(v) if v[:1] in "{[" else v) for k, v in metadata.items() if k not in ("config",)}
    return model.eval(), meta
