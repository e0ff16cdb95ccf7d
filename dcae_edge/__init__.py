"""dcae-edge: DC-AE (Deep Compression Autoencoder, Chen et al. ICLR 2025) and latent diffusion
transformers, from torch to edge runtimes.

    import dcae_edge
    ae = dcae_edge.load_autoencoder("f64")        # bundled edge weights, or a diffusers/efficientvit folder
    z = ae.encode(images)                         # NCHW float32 in [-1, 1] -> unscaled latents
    x = ae.decode(z)

Attributes load lazily so that torch-free code (``runtimes``) can import ``dcae_edge.schedules``.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DCAE": "autoencoder", "DCAEConfig": "autoencoder", "count_parameters": "autoencoder",
    "CheckpointError": "checkpoints", "build_autoencoder": "checkpoints", "load_autoencoder": "checkpoints",
    "save_autoencoder": "checkpoints", "save_diffusers": "checkpoints",
    "get_config": "presets", "PRESETS": "presets", "PUBLISHED": "presets", "EDGE": "presets", "VARIANT_ALIASES": "presets",
    "Denoiser": "denoiser", "DenoiserConfig": "denoiser", "build_denoiser": "denoiser", "load_denoiser": "denoiser",
    "save_denoiser": "denoiser", "DENOISER_PRESETS": "denoiser",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dcae_edge' has no attribute {name!r}")
