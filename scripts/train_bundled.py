"""Train everything the package bundles, plus the seed's two ablations, in one resumable run.

    python scripts/train_bundled.py --out runs/bundled              # GPU: runs the jobs concurrently
    python scripts/train_bundled.py --out runs/bundled --scale 0.02 # smoke test

Jobs (each a plain `python -m dcae_edge.train ...` command, logged to OUT/<job>.log):
  f64        dc-ae-edge-f64c128: phase 1 @256 -> phase 2 @512 -> phase 3 @256   (bundled)
  f32        dc-ae-edge-f32c32:  same three phases                              (bundled)
  f64-plain  ablation (a): the same f64 without residual shortcuts, phase 1 only, same steps
  digits-f64 the digit generator on 512px f64 latents of data/digits/train        (bundled)
then: held-out evaluation (256 and 512, phase 1 vs 3 = ablation (b)), fp16 copies of the bundled
weights in OUT/weights/, and torch reference files for the parity suite on this device.
Rerunning the same command resumes every job from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Learning rates: the paper's phase-1 AdamW lr (6.4e-5) is tuned for batch 96+ and ~10^5 steps; our
# budget is a few thousand steps, so phase 1 uses a higher lr (measured: scripts/README).
PHASES = [  # phase, steps, time budget (s), extra args
    (1, 6000, 200, ["--lr", "1e-3", "--batch-size", "32"]),
    (2, 1500, 55, ["--lr", "1e-4", "--batch-size", "12"]),
    (3, 1500, 55, ["--lr", "5.4e-5", "--batch-size", "32"]),
]


def run(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def ae_job(name: str, model: str, out: Path, scale: float, device: str, plain: bool = False, phases=PHASES) -> list[list[str]]:
    cmds = []
    for phase, steps, budget, extra in phases:
        cmd = [sys.executable, "-m", "dcae_edge.train", "--model", model, "--phase", str(phase), "--out", str(out / name),
               "--steps", str(max(2, int(steps * scale))), "--time-budget", str(budget * max(scale, 0.05)),
               "--device", device, "--ckpt-every", "500", "--log-every", "20", *extra]
        cmds.append(cmd + (["--plain"] if plain else []))
    return cmds


def chain(cmds: list[list[str]], log: Path) -> subprocess.Popen:
    """Run commands one after the other in a background shell; stop at the first failure."""
    script = " && ".join(" ".join(f"'{c}'" for c in cmd) for cmd in cmds)
    return run(["bash", "-c", script], log)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bundled", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply steps and time budgets (smoke tests)")
    ap.add_argument("--denoiser-budget", type=float, default=80.0, help="seconds of denoiser training")
    ap.add_argument("--sequential", action="store_true", help="one job at a time (CPU)")
    ap.add_argument("--collect", type=Path, default=None,
                    help="copy each bundled weight file here as soon as it exists (a GPU lease's $OUT)")
    args = ap.parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = {
        "f64": ae_job("f64", "dc-ae-edge-f64c128", out, args.scale, device),
        "f32": ae_job("f32", "dc-ae-edge-f32c32", out, args.scale, device),
        "f64-plain": ae_job("f64-plain", "dc-ae-edge-f64c128", out, args.scale, device, plain=True, phases=PHASES[:1]),
    }
    procs = {}
    for name, cmds in jobs.items():
        if args.sequential or device == "cpu":
            rc = chain(cmds, out / f"{name}.log").wait()
            procs[name] = rc
        else:
            procs[name] = chain(cmds, out / f"{name}.log")
    # bundled f64 weights are needed by the denoiser: wait for that job first
    weights = out / "weights"
    weights.mkdir(exist_ok=True)
    from dcae_edge.checkpoints import _load_ours, save_autoencoder

    def bundle_ae(name: str, key: str):
        proc = procs[name]
        rc = proc if isinstance(proc, int) else proc.wait()
        if rc != 0:
            print(f"job {name} failed (rc {rc}); see {out / (name + '.log')}", flush=True)
            return None
        model = _load_ours(out / name / "phase3" / "model.safetensors")
        dst = weights / f"{model.config.name}.safetensors"
        training = json.loads(json.dumps({f"phase{p}": json.loads((out / name / f"phase{p}" / "summary.json").read_text())
                                          for p in (1, 2, 3)}))
        save_autoencoder(model, dst, dtype=torch.float16, extra={"training": training})
        # install into the package so `load_autoencoder("f64")` and the exporters pick it up
        pkg = ROOT / "dcae_edge" / "weights"
        pkg.mkdir(exist_ok=True)
        shutil.copy(dst, pkg / dst.name)
        if args.collect:
            shutil.copy(dst, args.collect / dst.name)
        print(f"[{time.time() - t0:.0f}s] bundled {dst}", flush=True)
        return dst

    f64 = bundle_ae("f64", "f64")
    dn = None
    if f64 is not None:
        # the digit generator (python -m dcae_edge.digits --out data/digits first): whole images, no flips
        dcmd = [sys.executable, "-m", "dcae_edge.train_denoiser", "--autoencoder", "f64", "--data", "data/digits/train",
                "--out", str(out / "digits-f64"), "--resolution", "512", "--crops-per-image", "1", "--crop-min-scale", "1.0",
                "--no-flip", "--model", "dit-tiny", "--hidden-size", "192", "--depth", "6", "--batch-size", "128",
                "--steps", str(max(2, int(8000 * args.scale))), "--time-budget", str(args.denoiser_budget * max(args.scale, 0.05)),
                "--lr", "3e-4", "--device", device, "--recipe-steps", "20", "--recipe-cfg", "3.0", "--recipe-solver", "heun"]
        if run(dcmd, out / "digits-f64.log").wait() == 0:
            run([sys.executable, "scripts/bundle_digits.py", "--run", str(out / "digits-f64")], out / "digits-f64.log").wait()
            dn = ROOT / "dcae_edge" / "weights" / "digits-f64.safetensors"
            if args.collect:
                shutil.copy(dn, args.collect / dn.name)
            print(f"[{time.time() - t0:.0f}s] bundled {dn}", flush=True)
    f32 = bundle_ae("f32", "f32")
    for name in ("f64-plain",):
        p = procs[name]
        (p if isinstance(p, int) else p.wait())

    # evaluation: bundled models, phase 1 vs 3 (ablation b), residual vs plain (ablation a)
    ev = [sys.executable, "-m", "dcae_edge.evaluate", "--data", "data/photos/eval", "--resolutions", "256", "512",
          "--device", device, "--out", str(out / "eval"), "--autoencoder"]
    for cand in (out / "f64/phase1/model.safetensors", out / "f64/phase2/model.safetensors", out / "f64/phase3/model.safetensors",
                 out / "f64-plain/phase1/model.safetensors", out / "f32/phase1/model.safetensors", out / "f32/phase3/model.safetensors"):
        if cand.is_file():
            ev.append(str(cand))
    if ev[-1] != "--autoencoder":
        run(ev, out / "eval.log").wait()

    # torch references on this device for the parity suite
    refs = out / "references"
    if f64 is not None:
        cmd = [sys.executable, "-m", "runtimes.reference", "--autoencoder", "f64", "--resolution", "512", "--device", device,
               "--out", str(refs / f"f64-{device}.safetensors")]
        if dn is not None:
            cmd += ["--denoiser", str(ROOT / "dcae_edge" / "weights" / "digits-f64.safetensors")]
        run(cmd, out / "reference.log").wait()
    if f32 is not None:
        run([sys.executable, "-m", "runtimes.reference", "--autoencoder", "f32", "--resolution", "256", "--device", device,
             "--out", str(refs / f"f32-{device}.safetensors")], out / "reference.log").wait()
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
