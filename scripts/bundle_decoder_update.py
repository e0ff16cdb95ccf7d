"""Install a decoder-only continuation run as the bundled weights, only if it is better.

    python scripts/bundle_decoder_update.py --variant f64 \
        --run runs/cpu-f64-decoder-mse/phase3 runs/cpu-f64-decoder-mse-512/phase3 --note cpu_decoder_mse

``--run`` takes the chain of phase folders of one continuation; the last one's weights are
installed, every one's summary is recorded.

Checks, in order, and refuses with a message when one fails (the bundled file is then untouched):
the run holds the same architecture and the same encoder (``latent_fingerprint``: the latent space,
the scaling factor and the bundled denoiser stay valid); after re-estimating the decoder's
BatchNorm statistics over training crops (EMA weights average parameters, not statistics), its
held-out PSNR beats the bundled weights at every evaluated resolution. Then writes the fp16
safetensors atomically with the run's summary appended to the training history in its metadata,
and the held-out table to ``--report`` (Markdown + JSON).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcae_edge.checkpoints import _load_ours, bundled_weights_path, latent_fingerprint, save_autoencoder  # noqa: E402
from dcae_edge.data import ImageFolder, sample_photos, step_generator, to_model_range  # noqa: E402
from dcae_edge.evaluate import evaluate  # noqa: E402
from dcae_edge.training_utils import recalibrate_batchnorm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="f64")
    ap.add_argument("--run", required=True, type=Path, nargs="+",
                    help="phase folders (model.safetensors + summary.json), in training order; the last is installed")
    ap.add_argument("--note", required=True, help="key of this run in the weights' training history")
    ap.add_argument("--train-data", default="data/photos/train")
    ap.add_argument("--eval-data", default="data/photos/eval")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--bn-crops", type=int, default=256)
    ap.add_argument("--report", type=Path, default=Path("docs/training/bundled-f64-update"))
    ap.add_argument("--dry-run", action="store_true", help="evaluate and report, install nothing")
    ap.add_argument("--allow-new-latents", action="store_true",
                    help="the run trained the encoder too: install anyway (retrain the denoiser and INT8 artifacts after)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    bundled = bundled_weights_path(args.variant)
    if bundled is None:
        sys.exit(f"no bundled weights for {args.variant!r} in this checkout")
    runs, last = args.run, args.run[-1]
    old, new = _load_ours(bundled), _load_ours(last / "model.safetensors")
    if old.config.to_dict() | {"scaling_factor": 0} != new.config.to_dict() | {"scaling_factor": 0}:
        sys.exit(f"{last} holds another architecture than the bundled {old.config.name}")
    new_latents = latent_fingerprint(old) != latent_fingerprint(new)
    if new_latents and not args.allow_new_latents:
        sys.exit(f"{last} changed the encoder: the latent space (and the bundled denoiser trained on it) would "
                 "no longer match; pass --allow-new-latents and retrain what depends on it")
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    summary = summaries[-1]

    # decoder BatchNorm statistics as exact averages over training crops (the encoder has none)
    res = summary.get("resolution", 256)
    data = ImageFolder(args.train_data, min_side=min(res, 256))
    batches = [to_model_range(data.random_crops(16, res, step_generator(1234, i))[0]) for i in range(args.bn_crops // 16)]
    n_bn = recalibrate_batchnorm(new, batches)
    new.eval()

    rows = []
    for r in args.resolutions:
        x = to_model_range(ImageFolder(args.eval_data, min_side=64).eval_crops(r))
        a, b = evaluate(old, x), evaluate(new, x)
        rows.append({"resolution": r, "images": len(x), "bundled_psnr": a["psnr"], "bundled_ssim": a["ssim"],
                     "new_psnr": b["psnr"], "new_ssim": b["ssim"], "baseline_psnr": b["baseline_psnr"],
                     "baseline_ssim": b["baseline_ssim"]})
        print(json.dumps(rows[-1]), flush=True)
    better = all(r["new_psnr"] > r["bundled_psnr"] for r in rows)

    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(json.dumps({"runs": [str(r) for r in runs], "summaries": summaries,
                                                            "batchnorm_layers": n_bn, "rows": rows}, indent=1))
    lines = [f"Held-out photos (`{args.eval_data}`, centre crops): bundled `{bundled.name}` before and after "
             + ("whole-model training (the latent space changed): " if new_latents else "decoder-only training: ") + ", then ".join(f"`{r}` ({s.get('steps')} steps at {s.get('resolution')}², "
                                                        f"{s.get('pixel_loss', 'l1')})" for r, s in zip(runs, summaries)) + ". "
             f"Command: `python {' '.join(['scripts/bundle_decoder_update.py'] + (argv or sys.argv[1:]))}`", "",
             "| res | before PSNR / SSIM | after PSNR / SSIM | thumbnail baseline PSNR / SSIM |", "|---|---|---|---|"]
    lines += [f"| {r['resolution']}² | {r['bundled_psnr']:.2f} / {r['bundled_ssim']:.3f} | {r['new_psnr']:.2f} / "
              f"{r['new_ssim']:.3f} | {r['baseline_psnr']:.2f} / {r['baseline_ssim']:.3f} |" for r in rows]
    args.report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not better:
        sys.exit("not installed: the run does not beat the bundled weights at every resolution (see the report)")
    if args.dry_run:
        print("dry run: nothing installed")
        return
    with safe_open(str(bundled), "pt") as f:
        history = json.loads(f.metadata().get("training", "{}"))
    for i, s in enumerate(summaries):
        history[args.note if len(summaries) == 1 else f"{args.note}_{i + 1}"] = s
    history[f"{args.note}_batchnorm"] = f"decoder BatchNorm statistics re-estimated over {args.bn_crops} training crops at {res}px"
    # the margin over the thumbnail on the 4 packaged photos, as the fp16 file will load: the test suite
    # re-measures it anywhere (tests/test_autoencoder.py) and fails if the weights lose it
    as_stored = copy.deepcopy(new).half().float().eval()
    margins = {}
    for r in (256, 512):
        ev = evaluate(as_stored, sample_photos(r))
        margins[str(r)] = round(ev["psnr"] - ev["baseline_psnr"], 3)
    print(f"packaged photos, PSNR over the thumbnail baseline: {margins}")
    save_autoencoder(new, bundled, dtype=torch.float16, extra={"training": history, "packaged_photos_margin_db": margins})
    if new_latents:
        print("the latent space changed: retrain the bundled denoiser (scripts/train_digits_cpu.sh) and the INT8 artifacts")
    print(f"installed {bundled} ({bundled.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
