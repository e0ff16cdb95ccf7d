"""Encode and decode photos with an exported bundle; writes original | reconstruction PNGs.

    python -m runtimes.reconstruct --bundle exports/f64 photo1.jpg photo2.png --out-dir recon/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .images import load_image, save_grid
from .pipeline import BundleError, open_bundle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None, help="centre-crop/resize to this size (default: the bundle's)")
    ap.add_argument("--tile", type=int, default=None, help="tile size in px for images larger than the graph")
    ap.add_argument("--out-dir", default="reconstructions")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        pipe = open_bundle(args.bundle, args.backend, args.precision, args.device)
        for path in args.images:
            x = load_image(path, size=args.size or pipe.resolution)
            x = x.astype(np.float32)[None].transpose(0, 3, 1, 2) / 127.5 - 1
            y = np.clip(pipe.reconstruct(x, tile=args.tile), -1, 1)
            psnr = 10 * np.log10(4 / max(float(np.mean((y - x) ** 2)), 1e-12))
            dst = out / f"{Path(path).stem}_recon.png"
            save_grid(np.concatenate([x, y]), dst)
            print(f"{path}: PSNR {psnr:.2f} dB -> {dst}")
    except (BundleError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
