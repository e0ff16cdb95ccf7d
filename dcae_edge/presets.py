"""Config factories for every published DC-AE and for our CPU-trainable edge presets.

Published configs and scaling factors: efficientvit ``dc_ae.py`` / diffusers' conversion script.
Edge presets keep the design (same block types per stage, BatchNorm+ReLU in the first three
decoder stages, residual shortcuts, latent channels 32/128/512) with narrow high-resolution stages.
"""
from __future__ import annotations

from .autoencoder import DCAEConfig

R, V = "ResBlock", "EfficientViTBlock"


def _in_mix(name: str, latent: int, stages: int, scaling_factor: float) -> DCAEConfig:
    widths = (128, 256, 512, 512, 1024, 1024, 2048, 2048)[:stages]
    return DCAEConfig(
        name=name, latent_channels=latent,
        encoder_block_types=(R,) * 3 + (V,) * (stages - 3), decoder_block_types=(R,) * 3 + (V,) * (stages - 3),
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 4, 8) + (2,) * (stages - 3), decoder_layers_per_block=(0, 5, 10) + (2,) * (stages - 3),
        encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (stages - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (stages - 3),
        scaling_factor=scaling_factor,
    )


def _sana(name: str) -> DCAEConfig:
    return DCAEConfig(
        name=name, latent_channels=32,
        encoder_block_types=(R,) * 3 + (V,) * 3, decoder_block_types=(R,) * 3 + (V,) * 3,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )


def _edge(name: str, latent: int, widths: tuple[int, ...], enc_depths, dec_depths, scaling_factor: float = 1.0) -> DCAEConfig:
    n = len(widths)
    return DCAEConfig(
        name=name, latent_channels=latent,
        encoder_block_types=(R,) * 3 + (V,) * (n - 3), decoder_block_types=(R,) * 3 + (V,) * (n - 3),
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=enc_depths, decoder_layers_per_block=dec_depths,
        encoder_qkv_multiscales=((),) * n, decoder_qkv_multiscales=((),) * n,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (n - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (n - 3),
        scaling_factor=scaling_factor,
    )


# Published checkpoints (hub names without the "mit-han-lab/" prefix).
PUBLISHED = {
    "dc-ae-f32c32-in-1.0": lambda: _in_mix("dc-ae-f32c32-in-1.0", 32, 6, 0.3189),
    "dc-ae-f32c32-mix-1.0": lambda: _in_mix("dc-ae-f32c32-mix-1.0", 32, 6, 0.4552),
    "dc-ae-f64c128-in-1.0": lambda: _in_mix("dc-ae-f64c128-in-1.0", 128, 7, 0.2889),
    "dc-ae-f64c128-mix-1.0": lambda: _in_mix("dc-ae-f64c128-mix-1.0", 128, 7, 0.4538),
    "dc-ae-f128c512-in-1.0": lambda: _in_mix("dc-ae-f128c512-in-1.0", 512, 8, 0.4883),
    "dc-ae-f128c512-mix-1.0": lambda: _in_mix("dc-ae-f128c512-mix-1.0", 512, 8, 0.3620),
    "dc-ae-f32c32-sana-1.0": lambda: _sana("dc-ae-f32c32-sana-1.0"),
    "dc-ae-f32c32-sana-1.1": lambda: _sana("dc-ae-f32c32-sana-1.1"),
}

# Edge presets: trainable on a 2-core CPU, same block types and shortcuts as in/mix.
EDGE = {
    "dc-ae-edge-f32c32": lambda: _edge("dc-ae-edge-f32c32", 32, (16, 32, 64, 128, 128, 128),
                                       (0, 1, 1, 1, 1, 1), (0, 1, 2, 1, 1, 1)),
    "dc-ae-edge-f64c128": lambda: _edge("dc-ae-edge-f64c128", 128, (16, 32, 64, 128, 128, 128, 256),
                                        (0, 1, 1, 1, 1, 1, 1), (0, 1, 2, 1, 1, 1, 1)),
    "dc-ae-edge-f128c512": lambda: _edge("dc-ae-edge-f128c512", 512, (16, 32, 64, 64, 128, 128, 128, 512),
                                         (0, 1, 1, 1, 1, 1, 1, 1), (0, 1, 2, 1, 1, 1, 1, 1)),
}

PRESETS = {**PUBLISHED, **EDGE}

# Short names used by the exporters' --variant: the edge preset of each compression factor.
VARIANT_ALIASES = {"f32": "dc-ae-edge-f32c32", "f64": "dc-ae-edge-f64c128", "f128": "dc-ae-edge-f128c512"}


def get_config(name: str) -> DCAEConfig:
    """Config of a preset by name (``dc-ae-f64c128-in-1.0``, ``mit-han-lab/...``, ``f64``, ...)."""
    key = VARIANT_ALIASES.get(name, name.split("/")[-1].removesuffix("-diffusers"))
    if key not in PRESETS:
        raise KeyError(f"unknown DC-AE variant {name!r}; known: {', '.join(sorted(VARIANT_ALIASES) + sorted(PRESETS))}")
    return PRESETS[key]()
