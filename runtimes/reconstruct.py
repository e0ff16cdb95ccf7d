"""Encode and decode photos with an exported bundle; writes original | reconstruction images.

    python -m runtimes.reconstruct --bundle exports/f64 photo1.jpg photos/ --out recon/     # a folder
    python -m runtimes.reconstruct --bundle exports/f64 photo.jpg --out rec.png             # one file

``--out``: a file when it ends in an image extension (one input), otherwise a folder (one
``<name>_recon.png`` per input). Inputs may be image files or folders of images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dcae_edge.cli import at_least, short_warnings

from .images import IMAGE_SUFFIXES, expand_inputs, load_image, out_paths, save_grid
from .pipeline import BundleError, open_bundle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("images", nargs="+", help="image files and/or folders of images")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="auto", help="auto (fastest gated artifact on this CPU) | fp32 | fp16 | bf16 (openvino) | int8 | int8-bf16 (openvino: INT8 with the rest in bf16)")
    ap.add_argument("--format", default="onnx", help="onnx | ort | ort-runtime (onnxruntime only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=at_least(1), default=None, help="centre-crop/resize to this size (default: the bundle's)")
    ap.add_argument("--tile", type=int, default=None, help="tile size in px for images larger than the graph")
    ap.add_argument("--out", "--out-dir", dest="out", default="reconstructions",
                    help=f"a file ({', '.join(sorted(IMAGE_SUFFIXES))}) for one input, else a folder")
    args = ap.parse_args(argv)
    short_warnings()
    try:
        inputs = expand_inputs(args.images)
        dests = out_paths(args.out, [f"{Path(p).stem}_recon.png" for p in inputs])
        pipe = open_bundle(args.bundle, args.backend, args.precision, args.device, format=args.format)
        for path, dst in zip(inputs, dests):
            x = load_image(path, size=args.size or pipe.resolution)
            x = x.astype(np.float32)[None].transpose(0, 3, 1, 2) / 127.5 - 1
            y = np.clip(pipe.reconstruct(x, tile=args.tile), -1, 1)
            psnr = 10 * np.log10(4 / max(float(np.mean((y - x) ** 2)), 1e-12))
            save_grid(np.concatenate([x, y]), dst)
            print(f"{path}: PSNR {psnr:.2f} dB -> {dst}")
    except (BundleError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(inputs)} image(s) through {pipe.ran_as_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
