"""Sample images with a diffusion model in torch (the reference every exported runtime is checked
against) and decode them with its DC-AE.

    python -m dcae_edge.sample --model runs/dit-f64/model.safetensors --classes 0 1 2 3 --out samples.png
    python -m dcae_edge.sample --model path/to/dc-ae-f64c128-in-1.0-uvit-h-in-512px --classes 207 "golden retriever"

``--model`` is a denoiser checkpoint of ours (its autoencoder comes from its metadata) or a
released DC-AE generator (folder or hub id). Steps, guidance and solver default to the model's
recipe (``dcae_edge.schedules``), i.e. how its authors sampled.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from .schedules import (SamplerError, add_sampling_arguments, check_options, guided, initial_noise, recipe_ours, run,
                        step_noise, with_solver)


def cfg_model_fn(denoiser, class_labels: torch.Tensor | None, cfg_scale: float, record: list | None = None,
                 cfg_channels: int | None = None):
    """model_fn(x, t) for the samplers: one batched call of 2N for CFG ([cond, null])."""
    cfg = denoiser.config
    if cfg_scale != 1.0 and not cfg.conditional:
        raise SamplerError("classifier-free guidance needs a class-conditional denoiser; use cfg 1")

    def fn(x, t):
        n = x.shape[0]
        if cfg.conditional and cfg_scale != 1.0:
            xin = torch.cat([x, x])
            yin = torch.cat([class_labels, torch.full_like(class_labels, denoiser.null_class)])
        else:
            xin, yin = x, class_labels
        tin = torch.full((xin.shape[0],), float(t), dtype=torch.float32, device=x.device)
        if record is not None:
            record.append((xin.detach().cpu(), tin.cpu(), None if yin is None else yin.cpu()))
        out = denoiser(xin.float(), tin, yin).float()
        if xin.shape[0] == 2 * n:
            return guided(out[:n], out[n:], cfg_scale, cfg_channels or cfg.in_channels)
        return out

    return fn


def default_recipe(denoiser) -> dict:
    cfg = denoiser.config
    return {**recipe_ours(cfg.prediction), "null_class": cfg.num_classes, "num_classes": cfg.num_classes,
            "cfg_channels": cfg.in_channels}


@torch.no_grad()
def generate_latents(denoiser, class_labels, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                     sampler: str | None = None, n: int | None = None, record: list | None = None,
                     recipe: dict | None = None, latents=None) -> torch.Tensor:
    """Scaled latents (divide by the AE's scaling factor before decoding). ``latents``: explicit
    initial noise (numpy or torch, N x C x H x W) instead of the seed's, so a parity suite can drive
    every backend from the same noise."""
    cfg = denoiser.config
    recipe = with_solver(recipe or default_recipe(denoiser), sampler)
    steps = steps if steps is not None else int(recipe.get("steps", 30))
    cfg_scale = float(cfg_scale if cfg_scale is not None else recipe.get("cfg_scale", 1.0))
    check_options(steps, cfg_scale)
    device = next(denoiser.parameters()).device
    if cfg.conditional:
        labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.long, device=device).reshape(-1)
        if not labels.numel():
            raise SamplerError(f"this denoiser is class-conditional: pass class labels in [0, {cfg.num_classes - 1}]")
        if labels.min() < 0 or labels.max() >= cfg.num_classes:
            raise SamplerError(f"class ids must lie in [0, {cfg.num_classes - 1}], got {labels.tolist()}")
        n = labels.numel()
    else:
        if class_labels is not None and len(class_labels):
            raise SamplerError("this denoiser is unconditional: pass no class labels")
        if cfg_scale != 1.0:
            raise SamplerError("classifier-free guidance needs a class-conditional denoiser; use cfg 1")
        labels, n = None, n or 1
    shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
    if latents is not None:
        x0 = torch.as_tensor(np.asarray(latents, dtype=np.float32))
        if tuple(x0.shape) != shape:
            raise SamplerError(f"initial latents must be {shape}, got {tuple(x0.shape)}")
    else:
        x0 = torch.from_numpy(initial_noise(shape, seed))
    fresh = step_noise(seed)
    return run(recipe, cfg_model_fn(denoiser, labels, cfg_scale, record, recipe.get("cfg_channels")), x0.to(device), steps,
               channels=cfg.in_channels, noise_fn=lambda s: torch.from_numpy(fresh(s)).to(device),
               exp=torch.exp, to_numpy=lambda t: t.detach().float().cpu().numpy())


def main(argv=None):
    from .checkpoints import CheckpointError
    from .official import load_diffusion_model, resolve_classes
    from .training_utils import save_image_grid

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "--checkpoint", dest="model", required=True,
                    help="denoiser .safetensors of ours, or a released generator folder / hub id")
    add_sampling_arguments(ap)
    ap.add_argument("--out", default="samples.png")
    args = ap.parse_args(argv)
    try:
        m = load_diffusion_model(args.model)
        cfg = m.denoiser.config
        classes = None
        if cfg.conditional:
            default = list(range(cfg.num_classes)) if cfg.num_classes <= 16 else [207, 360, 387, 974, 88, 979, 417, 279]
            classes = resolve_classes(args.classes, m.class_names, cfg.num_classes) if args.classes else default
        z = generate_latents(m.denoiser, classes, args.steps, args.cfg, args.seed, args.sampler, n=args.n, recipe=m.recipe)
    except (CheckpointError, SamplerError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    with torch.no_grad():
        images = m.autoencoder.decode(z / m.scaling_factor)
    save_image_grid([images.clamp(-1, 1)], args.out)
    names = m.class_names
    print(f"wrote {args.out}: {len(images)} samples"
          + (f" of classes {[names[c] if c < len(names) else c for c in classes]}" if classes else ""))


if __name__ == "__main__":
    main()
