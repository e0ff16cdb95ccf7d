"""Generate images from an exported bundle (no torch needed).

    python -m runtimes.generate --bundle exports/f64 --classes 0 1 2 3 --seed 0 --out gen.png
    python -m runtimes.generate --bundle exports/dc-ae-f64c128-in-1.0-uvit-h-in-512px --classes 207 "golden retriever"

Steps, guidance and solver default to the bundle's recipe (how the model's authors sampled).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from dcae_edge import schedules
from dcae_edge.cli import short_warnings

from .images import IMAGE_SUFFIXES, out_paths, save_grid
from .pipeline import BundleError, open_bundle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--backend", default="onnxruntime", help="onnxruntime | openvino | coreml | torch")
    ap.add_argument("--precision", default="auto", help="auto (fastest gated artifact on this CPU) | fp32 | fp16 | bf16 (openvino) | int8 | int8-bf16 (openvino: INT8 with the rest in bf16)")
    ap.add_argument("--device", default="cpu")
    schedules.add_sampling_arguments(ap)
    ap.add_argument("--format", default="onnx", help="onnx | ort | ort-runtime (onnxruntime only)")
    ap.add_argument("--out", default="generated.png",
                    help=f"a grid file ({', '.join(sorted(IMAGE_SUFFIXES))}), else a folder with one PNG per image")
    args = ap.parse_args(argv)
    short_warnings()
    try:
        pipe = open_bundle(args.bundle, args.backend, args.precision, args.device, format=args.format)
        classes = args.classes
        if classes is None and pipe.class_names:
            k = len(pipe.class_names)  # a few well-known ImageNet classes for 1000-class models
            classes = list(range(k)) if k <= 16 else [207, 360, 387, 974, 88, 979, 417, 279]
        classes = pipe.class_ids(classes) if classes else classes
        t = time.perf_counter()
        images = pipe.generate(classes, args.steps, args.cfg, args.seed, args.sampler, n=args.n)
        single = Path(args.out).suffix.lower() in IMAGE_SUFFIXES
        label = lambda c: re.sub(r"[^\w.-]+", "_", str(pipe.class_names[c] if pipe.class_names else c))  # noqa: E731
        names = [f"{i:02d}_{label(c)}.png" for i, c in enumerate(classes)] if classes \
            else [f"{i:02d}.png" for i in range(len(images))]
        dests = out_paths(args.out, ["grid.png"] if single else names)
        if single:
            save_grid(images, dests[0])
        else:
            for img, dst in zip(images, dests):
                save_grid(img[None], dst)
    except (BundleError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [pipe.class_names[c] for c in classes] if classes and pipe.class_names else None
    print(f"wrote {args.out}: {len(images)} images in {time.perf_counter() - t:.1f} s "
          f"({pipe.ran_as_line()})"
          + (f", classes {names}" if names else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
