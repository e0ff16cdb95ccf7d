"""DC-AE: Deep Compression Autoencoder (Chen et al., ICLR 2025), in plain torch.

The module tree follows diffusers' ``AutoencoderDC`` names so that hub weights map with two small
tensor rewrites (see ``checkpoints.py``); the arithmetic follows the official efficientvit code:

* residual autoencoding: every down/up block adds a parameter-free shortcut (space-to-channel +
  channel-group averaging on the way down; channel duplication + channel-to-space on the way up),
  and so do the encoder output and the decoder input;
* RMSNorm over channels in plain ops (exportable, fp32 reduction);
* ReLU linear attention whose normaliser division uses ``clamp_min(eps)`` instead of ``+ eps``:
  torch's dynamo ONNX exporter deletes ``x + 1e-15`` and real photos then give 0/0 = NaN. The
  two forms are bit-identical in fp32 except for denominators in (0, 2e-8).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LINEAR_ATTENTION_EPS = 1e-15
NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class DCAEConfig:
    """Architecture of one DC-AE. Field names are diffusers' ``AutoencoderDC`` config keys."""

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"  # or "interpolate" (nearest + conv, SANA)
    downsample_block_type: str = "pixel_unshuffle"  # or "conv" (stride-2 conv, SANA)
    decoder_norm_types: tuple[str, ...] = ("rms_norm",) * 6
    decoder_act_fns: tuple[str, ...] = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0
    # False removes every parameter-free shortcut: the plain autoencoder of the paper's ablation.
    residual_autoencoding: bool = True
    name: str = "custom"

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        per_stage = lambda v: tuple(v) if not isinstance(v, str) else (v,) * n  # noqa: E731
        self.encoder_block_types = per_stage(self.encoder_block_types)
        self.decoder_block_types = per_stage(self.decoder_block_types)
        self.decoder_norm_types = per_stage(self.decoder_norm_types)
        self.decoder_act_fns = per_stage(self.decoder_act_fns)
        self.encoder_block_out_channels = tuple(int(c) for c in self.encoder_block_out_channels)
        self.decoder_block_out_channels = tuple(int(c) for c in self.decoder_block_out_channels)
        self.encoder_layers_per_block = tuple(int(c) for c in self.encoder_layers_per_block)
        self.decoder_layers_per_block = tuple(int(c) for c in self.decoder_layers_per_block)
        self.encoder_qkv_multiscales = tuple(tuple(s) for s in self.encoder_qkv_multiscales)
        self.decoder_qkv_multiscales = tuple(tuple(s) for s in self.decoder_qkv_multiscales)
        self.validate()

    def validate(self) -> None:
        n = len(self.encoder_block_out_channels)
        if len(self.decoder_block_out_channels) != n:
            raise ValueError("encoder and decoder must have the same number of stages")
        for key in ("encoder_block_types", "decoder_block_types", "encoder_layers_per_block",
                    "decoder_layers_per_block", "encoder_qkv_multiscales", "decoder_qkv_multiscales",
                    "decoder_norm_types", "decoder_act_fns"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"config.{key} has {len(getattr(self, key))} entries, expected one per stage ({n})")
        for t in self.encoder_block_types + self.decoder_block_types:
            if t not in ("ResBlock", "EfficientViTBlock"):
                raise ValueError(f"unknown block type {t!r}: use 'ResBlock' or 'EfficientViTBlock'")
        for t in self.decoder_norm_types:
            if t not in ("rms_norm", "batch_norm"):
                raise ValueError(f"unknown norm type {t!r}: use 'rms_norm' or 'batch_norm'")
        if self.encoder_block_out_channels[-1] % self.latent_channels and self.encoder_out_shortcut:
            raise ValueError("last encoder width must be a multiple of latent_channels for the output shortcut")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "DCAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class RMSNorm2d(nn.Module):
    """RMS norm over the channel dim of NCHW tensors, fp32 reduction, affine weight and bias."""

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(self.mean_square(x) + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]

    def mean_square(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of x² over channels, in fp32 (export.graph_forms swaps this per backend)."""
        return x.float().pow(2).mean(dim=1, keepdim=True)


def make_norm(kind: str, channels: int) -> nn.Module:
    return RMSNorm2d(channels) if kind == "rms_norm" else nn.BatchNorm2d(channels, eps=NORM_EPS)


def make_act(kind: str) -> nn.Module:
    acts = {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU}
    if kind not in acts:
        raise ValueError(f"unknown activation {kind!r}: use one of {sorted(acts)}")
    return acts[kind]()


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The mean over each group of consecutive channels (the encoder's latent shortcut)."""
    b, c, h, w = x.shape
    return x.reshape(b, out_channels, c // out_channels, h, w).mean(dim=2)


def space_to_channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Down shortcut: pixel_unshuffle(2) then mean over consecutive channel groups."""
    return channel_average(F.pixel_unshuffle(x, 2), out_channels)


def duplicate_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """repeat_interleave along channels, written as unsqueeze/repeat/reshape (exports everywhere; OpenVINO
    runs repeat's Tile in bf16, expand's Broadcast in f32 with conversions around it: 0.3 vs 1.2 ms of the
    bundled f64 decoder at 512²)."""
    b, c, h, w = x.shape
    return x.unsqueeze(2).repeat(1, 1, repeats, 1, 1).reshape(b, c * repeats, h, w)


def channel_to_space_duplicate(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Up shortcut: duplicate channels then pixel_shuffle(2)."""
    return F.pixel_shuffle(duplicate_channels(x, out_channels * 4 // x.shape[1]), 2)


class ResBlock(nn.Module):
    """conv3x3 -> act -> conv3x3 -> norm, plus identity."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.nonlinearity = make_act(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.nonlinearity(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """Extra qkv scale: depthwise k x k conv then grouped 1x1 conv (one group per q/k/v head)."""

    def __init__(self, channels: int, heads: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class LiteMLA(nn.Module):
    """ReLU linear attention (multi-scale), residual. Attention maths always runs in fp32."""

    def __init__(self, channels: int, head_dim: int, norm: str, scales: tuple[int, ...]):
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        # q/k/v and output projections are Linear layers on channels-last tensors, as in diffusers:
        # a 1x1 conv computes the same values but rounds differently (~1e-5 apart after a few blocks).
        # ``project`` is the one place that applies them (export.graph_forms swaps it per backend).
        self.to_qkv = nn.Linear(channels, 3 * heads * head_dim, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * heads * head_dim, heads, k) for k in scales)
        self.to_out = nn.Linear(heads * head_dim * (1 + len(scales)), channels, bias=False)
        self.norm_out = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.project(self.to_qkv, x)
        qkv = torch.cat([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], dim=1)
        # (B, heads, 3*head_dim, N): inside each head q, k, v are consecutive channel blocks.
        qkv = qkv.float().reshape(b, -1, 3 * self.head_dim, h * w)
        q, k, v = qkv.split(self.head_dim, dim=2)
        q, k = F.relu(q), F.relu(k)
        # H*W is static at trace time, so an exported graph holds one branch: export per resolution
        # class (the deepest stage of f64 at 256^2 is 4x4 = 16 tokens, which is quadratic).
        attend = linear_attention if h * w > self.head_dim else quadratic_attention
        if torch.is_autocast_enabled(x.device.type):  # keep the attention maths out of bf16/fp16
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = attend(q, k, v)
        else:
            out = attend(q, k, v)
        out = self.project(self.to_out, out.to(x.dtype).reshape(b, -1, h, w))
        return x + self.norm_out(out)

    @staticmethod
    def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear`` over the channels of an NCHW tensor."""
        return linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # ones row -> normaliser
    out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
    return out[:, :, :-1] / out[:, :, -1:].clamp_min(LINEAR_ATTENTION_EPS)


def quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(k.transpose(-1, -2), q)
    scores = scores / scores.sum(dim=2, keepdim=True).clamp_min(LINEAR_ATTENTION_EPS)
    return torch.matmul(v, scores)


class GLUMBConv(nn.Module):
    """1x1 expand (x8, SiLU) -> depthwise 3x3 -> gated SiLU -> 1x1 project -> RMSNorm, residual."""

    def __init__(self, channels: int, expand_ratio: int = 4):
        super().__init__()
        hidden = channels * expand_ratio
        self.conv_inverted = nn.Conv2d(channels, hidden * 2, 1)
        self.conv_depth = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.value_and_gate(x)
        return x + self.norm(self.conv_point(y * F.silu(gate)))

    def value_and_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expanded value and gate halves (export.graph_forms swaps this per backend)."""
        return self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, norm: str, scales: tuple[int, ...]):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, norm, scales)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """Halve H, W. Learned path: conv3x3 + pixel_unshuffle (in/mix) or stride-2 conv (SANA)."""

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.out_channels = out_channels
        if pixel_unshuffle:
            if out_channels % 4:
                raise ValueError(f"pixel_unshuffle down block needs out_channels % 4 == 0, got {out_channels}")
            self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, 1, 1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)

    # the shortcut, a method so that an exporter can trace an equivalent form (export.graph_forms)
    space_to_channel_average = staticmethod(space_to_channel_average)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The learned path (a method for the same reason)."""
        return F.pixel_unshuffle(self.conv(x), 2) if self.pixel_unshuffle else self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.downsample(x)
        if self.shortcut:
            y = y + self.space_to_channel_average(x, self.out_channels)
        return y


class UpBlock(nn.Module):
    """Double H, W. Learned path: conv3x3 + pixel_shuffle (in/mix) or nearest + conv3x3 (SANA)."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else out_channels * 4, 3, 1, 1)

    # the shortcut's channel copy, a method so that an exporter can trace an equivalent form (export.graph_forms)
    duplicate_channels = staticmethod(duplicate_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            if not self.shortcut:
                return y
            return y + F.pixel_shuffle(self.duplicate_channels(x, self.out_channels * 4 // x.shape[1]), 2)
        y = self.conv(x)
        if self.shortcut:
            # = pixel_shuffle(y) + channel_to_space_duplicate(x), bit for bit (pixel_shuffle only moves
            # values), with one pixel_shuffle instead of two and the add at the lower resolution:
            # OpenVINO bf16 decoder 46.6 -> 41.0 ms (bundled f64 at 512², AMD EPYC, 2 threads)
            y = y + self.duplicate_channels(x, y.shape[1] // x.shape[1])
        return F.pixel_shuffle(y, 2)


def make_block(kind: str, channels: int, head_dim: int, norm: str, act: str, scales: tuple[int, ...]) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, head_dim, norm, scales)


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    channel_average = staticmethod(channel_average)  # the latent shortcut, as in DownBlock

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, depths = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        shortcuts = cfg.residual_autoencoding
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if depths[0] > 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1)
        else:  # empty first stage: the stem itself halves the resolution
            self.conv_in = DownBlock(cfg.in_channels, widths[1], unshuffle, shortcut=False)
        self.down_blocks = nn.ModuleList()
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [make_block(cfg.encoder_block_types[i], width, cfg.attention_head_dim, "rms_norm", "silu",
                                 cfg.encoder_qkv_multiscales[i]) for _ in range(depth)]
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DownBlock(width, widths[i + 1], unshuffle, shortcut=shortcuts))
            self.down_blocks.append(nn.Sequential(*blocks))
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, 1, 1)
        self.out_shortcut = cfg.encoder_out_shortcut and shortcuts
        self.latent_channels = cfg.latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blocks in self.down_blocks:
            x = blocks(x)
        z = self.conv_out(x)
        if self.out_shortcut:  # mean over consecutive channel groups (space-to-channel with factor 1)
            z = z + self.channel_average(x, self.latent_channels)
        return z


class Decoder(nn.Module):
    duplicate_channels = staticmethod(duplicate_channels)  # the latent shortcut's copy, as in UpBlock

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        shortcuts = cfg.residual_autoencoding
        interpolate = cfg.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, 1, 1)
        self.in_shortcut = cfg.decoder_in_shortcut and shortcuts
        self.in_repeats = widths[-1] // cfg.latent_channels
        up_blocks = []
        for i in reversed(range(len(widths))):
            blocks = []
            if i < len(widths) - 1 and depths[i] > 0:
                blocks.append(UpBlock(widths[i + 1], widths[i], interpolate, shortcut=shortcuts))
            blocks += [make_block(cfg.decoder_block_types[i], widths[i], cfg.attention_head_dim,
                                  cfg.decoder_norm_types[i], cfg.decoder_act_fns[i], cfg.decoder_qkv_multiscales[i])
                       for _ in range(depths[i])]
            up_blocks.insert(0, nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(up_blocks)  # index = stage, run deepest first
        channels = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = RMSNorm2d(channels)
        self.conv_act = make_act(cfg.decoder_conv_act_fn)
        if depths[0] > 0:
            self.conv_out = nn.Conv2d(channels, cfg.in_channels, 3, 1, 1)
        else:  # empty first stage: the head itself doubles the resolution
            self.conv_out = UpBlock(channels, cfg.in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        if self.in_shortcut:
            x = x + self.duplicate_channels(z, self.in_repeats)
        for blocks in reversed(self.up_blocks):
            x = blocks(x)
        return self.conv_out(self.conv_act(self.norm_out(x)))


class DCAE(nn.Module):
    """Deep Compression Autoencoder. Images NCHW float32 in [-1, 1]; latents are unscaled
    (multiply by ``scaling_factor`` for a diffusion model, divide before decoding)."""

    def __init__(self, config: DCAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    def check_images(self, images: torch.Tensor) -> None:
        f = self.spatial_compression
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be NCHW (4-D), got shape {tuple(images.shape)}; add a batch dim with x[None]")
        if images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must have {self.config.in_channels} channels (RGB), got {images.shape[1]}")
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1], got {images.dtype}; use x.float() / 127.5 - 1")
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"height and width must be multiples of the compression factor {f}, got {h}x{w}; "
                             f"crop or pad to {h // f * f or f}x{w // f * f or f}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf")
        lo, hi = images.amin().item(), images.amax().item()
        if lo < -1.01 or hi > 1.01:
            raise ValueError(f"images must be in [-1, 1], got range [{lo:.3g}, {hi:.3g}]; "
                             "for uint8 pixels use x / 127.5 - 1")

    def check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise ValueError(f"latents must be a 4-D NCHW tensor, got {getattr(latents, 'shape', type(latents))}")
        if latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must have {self.config.latent_channels} channels, got {latents.shape[1]}")
        if not latents.is_floating_point():
            raise TypeError(f"latents must be floating point, got {latents.dtype}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        return self.decoder(latents)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction without input checks (training and tracing); use encode/decode in apps."""
        return self.decoder(self.encoder(images))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
