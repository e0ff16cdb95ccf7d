"""Shared fixtures: tiny configs of every DC-AE family (fast on 2 CPU cores), real photos."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from dcae_edge.autoencoder import DCAE, DCAEConfig  # noqa: E402
from dcae_edge.data import sample_photos  # noqa: E402

R, V = "ResBlock", "EfficientViTBlock"


def tiny_in_mix(latent: int = 16, stages: int = 4, width: int = 16, head_dim: int = 8) -> DCAEConfig:
    """in/mix family: empty stage 0, pixel-(un)shuffle, BatchNorm+ReLU in the first decoder stages."""
    widths = tuple(min(width * 2 ** max(0, i - 1), 4 * width) for i in range(stages - 1)) + (max(latent, 2 * width),)
    nbn = min(3, stages - 1)
    return DCAEConfig(
        name=f"tiny-in-f{2 ** (stages - 1)}c{latent}", latent_channels=latent, attention_head_dim=head_dim,
        encoder_block_types=(R,) * 2 + (V,) * (stages - 2), decoder_block_types=(R,) * 2 + (V,) * (stages - 2),
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(0,) + (1,) * (stages - 1), decoder_layers_per_block=(0, 2) + (1,) * (stages - 2),
        encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
        decoder_norm_types=("batch_norm",) * nbn + ("rms_norm",) * (stages - nbn),
        decoder_act_fns=("relu",) * nbn + ("silu",) * (stages - nbn))


def tiny_sana(latent: int = 8) -> DCAEConfig:
    """SANA family: stride-2 conv down, nearest+conv up, 5x5 multi-scale linear attention."""
    return DCAEConfig(
        name="tiny-sana", latent_channels=latent, attention_head_dim=8,
        encoder_block_types=(R, R, V, V), decoder_block_types=(R, R, V, V),
        encoder_block_out_channels=(8, 16, 16, 32), decoder_block_out_channels=(8, 16, 16, 32),
        encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu")


def tiny_edge_f64() -> DCAEConfig:
    """An f64c128 model (7 stages, 128 latent channels) small enough to export in seconds: the
    exporters' --variant f64 checks accept it."""
    widths = (8, 8, 16, 16, 32, 32, 128)
    return DCAEConfig(
        name="tiny-edge-f64c128", latent_channels=128, attention_head_dim=16,
        encoder_block_types=(R,) * 3 + (V,) * 4, decoder_block_types=(R,) * 3 + (V,) * 4,
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((),) * 7, decoder_qkv_multiscales=((),) * 7,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 4, decoder_act_fns=("relu",) * 3 + ("silu",) * 4)


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and norm affines, so equivalence tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def make_model(cfg: DCAEConfig, seed: int = 0) -> DCAE:
    torch.manual_seed(seed)
    return randomize_norms(DCAE(cfg), seed).eval()


def tiny_denoiser(input_size: int, num_classes: int = 3, in_channels: int = 128, depth: int = 2, arch: str = "dit",
                  seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny class-conditional denoiser with every weight perturbed: DiT starts with zeroed
    outputs, and a denoiser that predicts zeros cannot fail a parity test."""
    from dcae_edge.denoiser import build_denoiser

    torch.manual_seed(seed)
    model = build_denoiser(f"{arch}-tiny", input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                           hidden_size=32, depth=depth, **kw)
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def photos256():
    return sample_photos(256, 2)


@pytest.fixture(scope="session")
def photos128():
    return sample_photos(128, 2)


@pytest.fixture
def tiny_f64_file(tmp_path):
    """A saved tiny f64c128 autoencoder (our format), usable as --weights for --variant f64."""
    from dcae_edge.checkpoints import save_autoencoder

    path = tmp_path / "tiny-f64.safetensors"
    save_autoencoder(make_model(tiny_edge_f64()), path)
    return path


def write_release(folder: Path, name: str, ae: torch.nn.Module, denoiser: torch.nn.Module) -> Path:
    """A generator folder exactly as the model hub stores the released ones (see
    dcae_edge.official.write_release_folder)."""
    from dcae_edge.official import write_release_folder

    return write_release_folder(folder, name, ae, denoiser)
