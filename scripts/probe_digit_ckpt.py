"""Score a digit-generator training checkpoint with the judge while it trains (issue 17).

    python scripts/probe_digit_ckpt.py --run runs/digits-plain-uvit-u --per-class 2 --cfg 1 3 --steps 20

Loads ``RUN/ckpt.pt`` (EMA weights; the architecture from the run's saved configuration), samples
``per-class`` images of every digit with the run's flow recipe at each CFG, decodes with the bundled
f64 and prints the judge's accuracy. Also judges the one-step x0 estimate from pure noise (t = 1),
which is what the model believes each class looks like on average: if that is not the right digit,
sampling cannot be. Writes ``RUN/probe-<step>.png`` (rows: cfg values, then x0 at t = 1).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from dcae_edge.checkpoints import load_autoencoder
from dcae_edge.denoiser import build_denoiser
from dcae_edge.judge import Judge
from dcae_edge.sample import default_recipe, generate_latents
from dcae_edge.schedules import NUM_TRAIN_TIMESTEPS, with_solver
from dcae_edge.train_denoiser import denoiser_overrides
from dcae_edge.training_utils import load_training_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--solver", default="heun")
    ap.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    args = ap.parse_args()

    run = Path(args.run)
    ck = load_training_checkpoint(run / "ckpt.pt")
    key = json.loads(ck["run_key"])
    ae = load_autoencoder(key["autoencoder"]).eval()
    with safe_open(str(run / "latents.safetensors"), "pt") as f:
        latent_meta = f.metadata()
        c, h, w = f.get_slice("latents").get_shape()[1:]
    scaling = float(latent_meta["scaling_factor"])
    n_cls = len(json.loads(latent_meta["class_names"]))
    model = build_denoiser(key["model"], **denoiser_overrides(key, c, h, n_cls)).eval()
    model.load_state_dict(ck["model" if args.raw else "ema"])
    judge = Judge()
    recipe = with_solver({**default_recipe(model), "steps": args.steps}, args.solver)
    labels = np.repeat(np.arange(n_cls), args.per_class)

    def decode(z):  # N x 3 x H x W in [-1, 1], what the judge reads
        with torch.no_grad():
            return ae.decode(z / scaling).clamp(-1, 1).numpy()

    def thumbs(x):
        return np.concatenate([np.asarray(Image.fromarray(((i.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8))
                                          .resize((96, 96))) for i in x], 1)

    rows, report = [], {"step": ck["step"]}
    for cfg in args.cfg:
        z = generate_latents(model, labels, args.steps, cfg, seed=1, recipe=recipe)
        imgs = decode(z)
        pred, _ = judge.classify(imgs)
        report[f"cfg{cfg:g}"] = float((pred == labels).mean())
        rows.append(imgs)
    # x0 from pure noise: flow predicts v = noise - x0 and x_1 = noise
    g = torch.Generator().manual_seed(2)
    noise = torch.randn((len(labels), c, h, w), generator=g)
    with torch.no_grad():
        v = model(noise, torch.full((len(labels),), float(NUM_TRAIN_TIMESTEPS)), torch.as_tensor(labels))[:, :c]
    imgs = decode(noise - v)
    report["x0_at_t1"] = float((judge.classify(imgs)[0] == labels).mean())
    rows.append(imgs)
    Image.fromarray(np.concatenate([thumbs(r) for r in rows], 0)).save(run / f"probe-{ck['step']}.png")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
