"""Assemble an offline real-photo set from Debian packages and PyPI packages.

    python -m dcae_edge.photos --out data/photos

Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a
temporary folder (nothing is installed). Images ship inside scikit-image / scikit-learn wheels.
Every image is split by *whole photo* (never by crop) into ``train/``, ``calibration/`` and
``eval/`` (one sub-folder per source collection), re-encoded as JPEG (quality 95) with its short side capped, and listed with its source
package, original path and licence in ``manifest.json``.

Held-out evaluation photos come from other sources than the training photos (standard test
images: scikit-image, scikit-learn, OpenCV samples, KDE Palapeli), so evaluation measures
generalisation to new photos, not memorisation.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# (package, glob inside the unpacked package, licence as stated in the package's copyright file)
DEBIAN_SOURCES = [
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/*.jpg", "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0 (per file, debian/copyright)"),
    ("lomiri-wallpapers-20.04", "usr/share/backgrounds/*.jpg", "CC-BY-SA-4.0 / CC-BY-4.0 (per file, debian/copyright)"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/*.jpg", "GPL-2+"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/*/contents/images/*", "GPL-2+ / LGPL (debian/copyright)"),
    ("ukui-wallpapers", "usr/share/backgrounds/*", "CC-BY-SA-3.0"),
    ("palapeli-data", "usr/share/palapeli/collection/*.jpg", "GPL-2+ / CC0 / LGPL (debian/copyright)"),
    ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/*.jpg", "BSD-3-Clause (data/*)"),
]

# Standard test photos from other sources than the wallpapers: the held-out evaluation set.
EVAL_SOURCES = {"palapeli-data", "opencv-doc", "scikit-image", "scikit-learn"}
OPENCV_PHOTOS = {"baboon", "fruits", "butterfly", "building", "home", "leuvenA", "messi5", "orange",
                 "apple", "stuff", "squirrel_cls", "aero1", "lena"}
SKIMAGE_PHOTOS = {"astronaut": "public domain (NASA)", "chelsea": "CC0 (Stefan van der Walt)",
                  "coffee": "CC0 (Rachel Michetti)", "rocket": "public domain (NASA)",
                  "motorcycle_left": "see skimage.data.stereo_motorcycle docstring (Middlebury)"}
CALIBRATION_EVERY = 5  # every 5th training-source photo goes to the calibration split


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _is_colour_photo(img: Image.Image, min_side: int) -> tuple[bool, str]:
    if min(img.size) < min_side:
        return False, f"smaller than {min_side}px"
    arr = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.float32)
    if np.abs(arr - arr.mean(axis=2, keepdims=True)).mean() < 2.0:
        return False, "greyscale"
    return True, ""


def _debian_images(workdir: Path, packages: list[tuple[str, str, str]]):
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    names = [p for p, _, _ in packages]
    subprocess.run(["apt-get", "download", *names], cwd=debs, check=True, capture_output=True)
    for package, pattern, licence in packages:
        deb = sorted(debs.glob(f"{package}_*.deb"))
        if not deb:
            raise RuntimeError(f"apt-get download {package} produced no .deb")
        root = workdir / package
        subprocess.run(["dpkg-deb", "-x", str(deb[-1]), str(root)], check=True)
        files = sorted(glob.glob(str(root / pattern)))
        if package == "plasma-workspace-wallpapers":  # one file (the largest) per wallpaper
            best = {}
            for f in files:
                key = Path(f).parts[-4]
                if key not in best or os.path.getsize(f) > os.path.getsize(best[key]):
                    best[key] = f
            files = sorted(best.values())
        if package == "opencv-doc":
            files = [f for f in files if Path(f).stem in OPENCV_PHOTOS]
        for f in files:
            yield package, str(Path(f).relative_to(root)), licence, Path(f).read_bytes()


def _pypi_images():
    try:
        from skimage import data as skdata

        for name, licence in SKIMAGE_PHOTOS.items():
            arr = skdata.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skdata, name)()
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            yield "scikit-image", f"skimage.data.{name}", licence, buf.getvalue()
    except ImportError:
        print("scikit-image not installed: skipping its photos")
    try:
        from sklearn.datasets import load_sample_images

        ds = load_sample_images()
        for arr, fname in zip(ds.images, ds.filenames):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            yield "scikit-learn", f"sklearn/datasets/images/{Path(fname).name}", "CC-BY-2.0 (Flickr)", buf.getvalue()
    except ImportError:
        print("scikit-learn not installed: skipping its photos")


def assemble(out: Path, max_side: int = 768, min_side: int = 256, debian: bool = True) -> dict:
    out = Path(out)
    tmp_out = Path(tempfile.mkdtemp(prefix=".photos.", dir=out.parent if out.parent.exists() else None))
    entries, skipped, seen = [], [], set()
    with tempfile.TemporaryDirectory() as work:
        sources = list(_debian_images(Path(work), DEBIAN_SOURCES)) if debian else []
        sources += list(_pypi_images())
        train_count = 0
        for package, origin, licence, raw in sources:
            digest = _sha(raw)
            if digest in seen:  # the two lomiri packages share files
                continue
            seen.add(digest)
            try:
                img = Image.open(io.BytesIO(raw))
                img.load()
                img = img.convert("RGB")
            except Exception as e:  # unreadable image: count it, keep going
                skipped.append({"origin": f"{package}:{origin}", "reason": f"unreadable ({e})"})
                continue
            ok, why = _is_colour_photo(img, min_side)
            if not ok:
                skipped.append({"origin": f"{package}:{origin}", "reason": why})
                continue
            if package in EVAL_SOURCES:
                split = "eval"
            else:
                split = "calibration" if train_count % CALIBRATION_EVERY == CALIBRATION_EVERY - 1 else "train"
                train_count += 1
            scale = max_side / min(img.size)
            if scale < 1:
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
            if package == "plasma-workspace-wallpapers":
                name = Path(origin).parts[-4]
            elif package == "scikit-image":
                name = origin.rsplit(".", 1)[-1]
            else:
                name = Path(origin).stem
            stem = f"{package}__{name}"
            # one sub-folder per source collection: an ImageFolder class (used by the denoiser demo)
            collection = "lomiri-wallpapers" if package.startswith("lomiri") else package
            rel = f"{split}/{collection}/{stem}.jpg"
            (tmp_out / split / collection).mkdir(parents=True, exist_ok=True)
            img.save(tmp_out / rel, quality=95)
            entries.append({"file": rel, "split": split, "package": package, "origin": origin, "licence": licence,
                            "size": list(img.size), "source_sha256_16": digest})
    manifest = {"max_side": max_side, "min_side": min_side, "images": entries, "skipped": skipped,
                "counts": {s: sum(e["split"] == s for e in entries) for s in ("train", "calibration", "eval")}}
    (tmp_out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp_out, out)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/photos", type=Path)
    ap.add_argument("--max-side", type=int, default=768, help="cap on the short side after re-encoding")
    ap.add_argument("--min-side", type=int, default=256, help="skip images whose short side is smaller")
    ap.add_argument("--no-debian", action="store_true", help="only the images shipped in PyPI packages")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    m = assemble(args.out, args.max_side, args.min_side, debian=not args.no_debian)
    print(f"wrote {args.out}: {m['counts']}, skipped {len(m['skipped'])} (see manifest.json)")


if __name__ == "__main__":
    main()
