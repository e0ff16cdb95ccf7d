"""Sample images from a trained denoiser and decode them with its DC-AE.

    python -m dcae_edge.sample --checkpoint runs/dit-f64/model.safetensors --classes 0 1 2 3 \
        --steps 30 --cfg 3.0 --seed 0 --out samples.png

The autoencoder defaults to the one recorded in the denoiser checkpoint; another one is refused
unless its weights are identical (the denoiser only knows that autoencoder's latent space).
"""
from __future__ import annotations

import argparse

import torch

from .schedules import add_sampling_arguments, guided, initial_noise, sample


def cfg_model_fn(denoiser, class_labels: torch.Tensor | None, cfg_scale: float, record: list | None = None):
    """model_fn(x, t) for the samplers: one batched call of 2N for CFG (cond, null)."""
    cfg = denoiser.config
    if cfg_scale != 1.0 and not cfg.conditional:
        raise ValueError("classifier-free guidance needs a class-conditional denoiser; use --cfg 1")

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
        out = denoiser(xin, tin, yin)[:, : cfg.in_channels].float()
        if xin.shape[0] == 2 * n:
            return guided(out[:n], out[n:], cfg_scale)
        return out

    return fn


@torch.no_grad()
def generate_latents(denoiser, class_labels, steps: int = 30, cfg_scale: float = 1.0, seed: int = 0,
                     sampler: str | None = None, n: int | None = None, record: list | None = None) -> torch.Tensor:
    """Scaled latents (divide by the AE's scaling factor before decoding)."""
    cfg = denoiser.config
    device = next(denoiser.parameters()).device
    if cfg.conditional:
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        denoiser.check_inputs(torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size), torch.zeros(1),
                              labels, allow_null=True)
        n = labels.numel()
    else:
        if class_labels is not None and len(class_labels):
            raise ValueError("this denoiser is unconditional: pass no class labels")
        labels, n = None, n or 1
    x = torch.from_numpy(initial_noise((n, cfg.in_channels, cfg.input_size, cfg.input_size), seed)).to(device)
    return sample(cfg.prediction, cfg_model_fn(denoiser, labels, cfg_scale, record), x, steps, sampler)


def main(argv=None):
    from .checkpoints import latents_match, load_autoencoder
    from .denoiser import load_denoiser
    from .training_utils import save_image_grid

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="denoiser .safetensors of ours")
    ap.add_argument("--autoencoder", default=None, help="defaults to the one the denoiser was trained on")
    add_sampling_arguments(ap)
    ap.add_argument("--out", default="samples.png")
    args = ap.parse_args(argv)

    denoiser, meta = load_denoiser(args.checkpoint)
    ae = load_autoencoder(args.autoencoder or meta.get("autoencoder_source", "f64"))
    if not latents_match(ae, meta):
        raise SystemExit(f"error: {args.checkpoint} was trained on latents of another autoencoder "
                         f"({meta.get('autoencoder_source')}, fingerprint {meta['autoencoder_fingerprint']}); "
                         "pass that autoencoder with --autoencoder")
    classes = args.classes if denoiser.config.conditional else None
    if denoiser.config.conditional and not classes:
        classes = list(range(min(4, denoiser.config.num_classes)))
    z = generate_latents(denoiser, classes, args.steps, args.cfg, args.seed, args.sampler, n=args.n)
    images = ae.decode(z / float(meta.get("latent_scaling_factor", ae.scaling_factor)))
    save_image_grid([images.clamp(-1, 1)], args.out)
    names = meta.get("class_names") or []
    print(f"wrote {args.out}: {len(images)} samples"
          + (f" of classes {[names[c] if c < len(names) else c for c in classes]}" if classes else ""))


if __name__ == "__main__":
    main()
