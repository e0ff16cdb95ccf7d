"""Install a trained digit generator as the bundled denoiser (fp16, ~8 MB): class names "0".."9",
its sampling recipe (steps / CFG / solver chosen with the judge: --steps --cfg), and the bundled
autoencoder it was trained for (checked by latent fingerprint; refused otherwise).

    python scripts/bundle_digits.py --run runs/digits-f64 --steps 20 --cfg 3.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    import torch

    from dcae_edge.checkpoints import autoencoder_fingerprint, latent_fingerprint, latents_match, load_autoencoder
    from dcae_edge.denoiser import load_denoiser, save_denoiser
    from dcae_edge.schedules import recipe_ours, with_solver

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--solver", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "dcae_edge" / "weights" / "digits-f64.safetensors")
    args = ap.parse_args()
    dn, meta = load_denoiser(args.run / "model.safetensors")
    ae = load_autoencoder("f64")
    if not latents_match(ae, meta):
        raise SystemExit("error: this run was trained on the latents of another encoder than the bundled f64")
    recipe = dict(meta.get("recipe") or recipe_ours(dn.config.prediction))
    if args.solver:
        recipe = with_solver(recipe, args.solver)
    if args.steps:
        recipe["steps"] = args.steps
    if args.cfg:
        recipe["cfg_scale"] = args.cfg
    keep = {k: v for k, v in meta.items() if k not in ("format", "kind", "recipe", "autoencoder_source")}
    save_denoiser(dn, args.out, dtype=torch.float16,
                  extra={**keep, "recipe": recipe, "autoencoder_source": "f64", "latent_fingerprint": latent_fingerprint(ae),
                         "autoencoder_fingerprint": autoencoder_fingerprint(ae),
                         "class_names": [str(i) for i in range(10)]})
    print(f"bundled {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {dn.config.name}, recipe {recipe}")


if __name__ == "__main__":
    main()
