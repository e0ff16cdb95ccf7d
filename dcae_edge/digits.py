"""Class-conditional digits 0-9 rendered from real fonts: a generator task whose samples can be
checked (a small classifier reads them), unlike photo textures.

    python -m dcae_edge.digits --out data/digits                 # fonts from Debian + photos -> images
    python -m dcae_edge.digits --out data/digits --per-class 200 --heldout-per-class 50

Each image is 512² (``--size``): one digit from a font, at a random size (40-75% of the height),
position, rotation (±15°), width and stroke weight, in a colour that contrasts with its
background, on a crop of a training photo (``data/photos/train``, else the packaged sample
photos) or a plain colour. Everything is a pure function of (seed, split, index), so the set can
be rebuilt bit for bit.

Fonts come from Debian packages (``apt-get download`` + ``dpkg-deb -x`` into ``--fonts``; nothing
is installed); ``assets/digit-fonts.json`` lists the packages, globs, licences and excluded files.
The split is by *font package*: the held-out packages (and the fonts that ship inside matplotlib,
which are always present) never appear in training, so accuracy on held-out renders measures
reading digits, not memorising fonts. Writes ``OUT/{train,heldout}/<digit>/<index>.jpg`` and
``OUT/manifest.json`` (font package, file, licence and sha256; counts; backgrounds).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).parent / "assets"
CLASS_NAMES = [str(d) for d in range(10)]
# held-out font packages: a spread of styles (sans, serif, mono, didone, hand, script) never trained on
HELDOUT_PACKAGES = {"fonts-dejavu-core", "fonts-dejavu-extra", "fonts-cmu", "fonts-comic-neue", "fonts-kristi",
                    "fonts-go", "fonts-gfs-didot", "fonts-mononoki"}
# fonts inside the matplotlib wheel (always installed): held out too, and what the tests render with
MATPLOTLIB_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
                    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
                    "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
                    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class FontFile:
    package: str
    file: str          # path inside the package (or the wheel)
    licence: str
    path: str          # on this machine
    split: str


def font_catalogue() -> dict:
    return json.loads((ASSETS / "digit-fonts.json").read_text())


def split_of(package: str) -> str:
    return "heldout" if package in HELDOUT_PACKAGES or package == "matplotlib" else "train"


def matplotlib_fonts() -> list[FontFile]:
    import matplotlib

    root = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return [FontFile("matplotlib", f"mpl-data/fonts/ttf/{name}", "matplotlib font licences (DejaVu: Bitstream Vera; "
                     "STIX: OFL-1.1; cm*: BaKoMa, free)", str(root / name), "heldout")
            for name in MATPLOTLIB_FONTS if (root / name).is_file()]


def fetch_fonts(cache: Path, packages: list[str] | None = None) -> list[FontFile]:
    """Download and unpack the catalogue's packages into ``cache`` (reused when present)."""
    cat = font_catalogue()
    wanted = [p for p in cat["packages"] if packages is None or p["package"] in packages]
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    missing = sorted({p["package"] for p in wanted if not (cache / p["package"]).is_dir()})
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(["apt-get", "download", *missing], cwd=tmp, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"apt-get download of {len(missing)} font packages failed (network to the Debian "
                                   f"archive needed once):\n{r.stderr.strip()[-800:]}")
            for pkg in missing:
                debs = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
                if not debs:
                    raise RuntimeError(f"apt-get download {pkg} produced no .deb")
                stage = cache / f".{pkg}.partial"
                shutil.rmtree(stage, ignore_errors=True)
                subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(stage)], check=True)
                os.replace(stage, cache / pkg)
    out = []
    for p in wanted:
        root = cache / p["package"]
        for f in sorted(glob.glob(str(root / p["glob"]))):
            rel = os.path.relpath(f, root)
            if f"{p['package']}:{os.path.basename(f)}" in cat["exclude"] or not os.path.isfile(f):
                continue
            out.append(FontFile(p["package"], rel, p["licence"], f, split_of(p["package"])))
    return out


def all_fonts(cache: Path | None) -> list[FontFile]:
    """Catalogue fonts (when fetched into ``cache``) plus matplotlib's, deduplicated by file name."""
    fonts = fetch_fonts(cache) if cache is not None else []
    seen = {os.path.basename(f.path) for f in fonts}
    return fonts + [f for f in matplotlib_fonts() if os.path.basename(f.path) not in seen]


# ---------------------------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, size: int, photos: list[Image.Image]) -> Image.Image:
    if not photos or rng.random() < 0.3:
        c0 = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            return Image.new("RGB", (size, size), tuple(int(v) for v in c0))
        c1 = rng.integers(0, 256, 3)  # a linear gradient
        ramp = np.linspace(0, 1, size)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[None, :, None]
        arr = c0[None, None] * (1 - ramp) + c1[None, None] * ramp
        return Image.fromarray(np.broadcast_to(arr, (size, size, 3)).round().astype(np.uint8))
    photo = photos[int(rng.integers(len(photos)))]
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.4, 1.0))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def _luminance(rgb) -> float:
    r, g, b = (np.asarray(rgb, np.float64) / 255.0).T
    return float(0.299 * r + 0.587 * g + 0.114 * b)


STYLES = ("varied", "clean")


def render_digit(font: FontFile, digit: int, rng: np.random.Generator, size: int = 512,
                 photos: list[Image.Image] | None = None, style: str = "varied") -> tuple[Image.Image, dict]:
    """One 512² image of ``digit`` in ``font``; every random choice comes from ``rng``. ``clean``:
    dark ink on a plain light colour, large (55-70% of the height), near the centre, within ±5°: the
    font's shape is most of what varies (a generator learns it in CPU hours; see docs/training.md)."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {STYLES}")
    clean = style == "clean"
    bg = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3))) if clean \
        else _background(rng, size, photos or [])
    target_h = size * (rng.uniform(0.55, 0.70) if clean else rng.uniform(0.40, 0.75))
    probe = ImageFont.truetype(font.path, 200)
    box = probe.getbbox(str(digit))
    glyph_h = max(1, box[3] - box[1])
    fsize = max(8, int(round(200 * target_h / glyph_h)))
    f = ImageFont.truetype(font.path, fsize)
    stroke = int(rng.integers(0, max(1, fsize // 40) + 1)) if rng.random() < 0.35 else 0
    l, t, r, b = f.getbbox(str(digit), stroke_width=stroke)
    pad = 4 + stroke
    mask = Image.new("L", (r - l + 2 * pad, b - t + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - l, pad - t), str(digit), fill=255, font=f, stroke_width=stroke, stroke_fill=255)
    aspect = rng.uniform(0.9, 1.1) if clean else rng.uniform(0.8, 1.2)  # narrower / wider lettering
    mask = mask.resize((max(1, int(mask.width * aspect)), mask.height), Image.Resampling.BICUBIC)
    angle = float(rng.uniform(-5, 5) if clean else rng.uniform(-15, 15))
    mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    if max(mask.size) > size - 16:  # never cut the digit off
        k = (size - 16) / max(mask.size)
        mask = mask.resize((max(1, int(mask.width * k)), max(1, int(mask.height * k))), Image.Resampling.BICUBIC)
    if clean:  # centred within ±24 px
        x = int(np.clip((size - mask.width) // 2 + rng.integers(-24, 25), 8, max(8, size - mask.width - 8)))
        y = int(np.clip((size - mask.height) // 2 + rng.integers(-24, 25), 8, max(8, size - mask.height - 8)))
    else:
        x = int(rng.integers(8, size - mask.width - 8 + 1))
        y = int(rng.integers(8, size - mask.height - 8 + 1))
    region = np.asarray(bg.crop((x, y, x + mask.width, y + mask.height)), np.float64)
    m = np.asarray(mask, np.float64) / 255.0
    under = (region * m[..., None]).sum((0, 1)) / max(m.sum(), 1.0)
    lum_bg = _luminance(under)
    colour = rng.integers(0, 71, 3) if clean else None
    for _ in range(0 if clean else 30):  # a random colour that stands out from what lies under the digit
        c = rng.integers(0, 256, 3)
        if abs(_luminance(c) - lum_bg) >= 0.4:
            colour = c
            break
    if colour is None:
        colour = np.array([0, 0, 0]) if lum_bg > 0.5 else np.array([255, 255, 255])
    arr = np.asarray(bg, np.float64).copy()
    sub = arr[y:y + mask.height, x:x + mask.width]
    arr[y:y + mask.height, x:x + mask.width] = sub * (1 - m[..., None]) + colour[None, None] * m[..., None]
    img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
    meta = {"digit": digit, "font": f"{font.package}:{font.file}", "font_size": fsize, "angle": round(angle, 2),
            "aspect": round(float(aspect), 3), "stroke": stroke, "colour": [int(v) for v in colour], "box": [x, y, mask.width, mask.height]}
    return img, meta


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_sample(index: int, split: str, fonts: list[FontFile], photos: list[Image.Image], seed: int = 0,
                  size: int = 512, style: str = "varied") -> tuple[Image.Image, dict]:
    """Sample ``index`` of a split: digit ``index % 10``, font and everything else from (seed, split, index)."""
    pool = [f for f in fonts if f.split == split]
    if not pool:
        raise ValueError(f"no {split} fonts available (fetch them: python -m dcae_edge.digits --out ...)")
    rng = sample_rng(seed, split, index)
    font = pool[int(rng.integers(len(pool)))]
    img, meta = render_digit(font, index % 10, rng, size, photos, style)
    return img, meta


def load_background_photos(folder: str | Path | None, max_side: int = 768) -> tuple[list[Image.Image], list[str]]:
    """Training photos as backgrounds (never the held-out evaluation photos); the packaged sample
    photos when the photo set has not been assembled."""
    paths: list[Path] = []
    if folder and Path(folder).is_dir():
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        paths = sorted(ASSETS.glob("*.jpg"))
    photos = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        k = max_side / min(im.size)
        if k < 1:
            im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.LANCZOS)
        photos.append(im)
    return photos, [str(p) for p in paths]


def build(out: Path, fonts_cache: Path, photos_dir: str, per_class: int, heldout_per_class: int, seed: int = 0,
          size: int = 512, quality: int = 92, style: str = "varied") -> dict:
    from tqdm import tqdm

    fonts = all_fonts(fonts_cache)
    photos, photo_paths = load_background_photos(photos_dir) if style == "varied" else ([], [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {}
        for split, n in (("train", per_class * 10), ("heldout", heldout_per_class * 10)):
            for d in CLASS_NAMES:
                (stage / split / d).mkdir(parents=True, exist_ok=True)
            for i in tqdm(range(n), desc=f"rendering {split}", dynamic_ncols=True):
                img, _ = render_sample(i, split, fonts, photos, seed, size, style)
                img.save(stage / split / str(i % 10) / f"{i:06d}.jpg", quality=quality)
            counts[split] = n
        manifest = {
            "seed": seed, "size": size, "style": style, "counts": counts, "class_names": CLASS_NAMES,
            "heldout_packages": sorted(HELDOUT_PACKAGES | {"matplotlib"}),
            "fonts": [{"package": f.package, "file": f.file, "licence": f.licence, "split": f.split,
                       "sha256": hashlib.sha256(Path(f.path).read_bytes()).hexdigest()[:16]} for f in fonts],
            "font_counts": {s: sum(f.split == s for f in fonts) for s in SPLITS},
            "backgrounds": [os.path.relpath(p) for p in photo_paths]}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def has_plain_background(path: str | Path) -> bool:
    return has_plain_background_image(Image.open(path))


def has_plain_background_image(image: Image.Image) -> bool:
    """A plain colour or linear gradient behind the digit: the 2-px border strips (which the digit
    never reaches) have almost no second differences; a photo crop has texture there."""
    a = np.asarray(image.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR), np.float64)
    strips = (a[:2], a[-2:], a[:, :2].transpose(1, 0, 2), a[:, -2:].transpose(1, 0, 2))
    return max(float(np.abs(np.diff(s, 2, axis=1)).mean()) for s in strips) < 1.0


def link_plain_subset(root: Path, split: str = "train") -> dict[str, int]:
    """ROOT/SPLIT-plain: symlinks to the renders on plain / gradient backgrounds (the generator's
    training set: photo backgrounds carry most of the latent variance, see docs/training.md)."""
    src, dst = Path(root) / split, Path(root) / f"{split}-plain"
    counts = {}
    for d in CLASS_NAMES:
        (dst / d).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / d).glob("*.jpg")):
            if has_plain_background(f):
                link = dst / d / f.name
                if not link.exists():
                    os.symlink(f.resolve(), link)
                counts[d] = counts.get(d, 0) + 1
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plain-subset", action="store_true",
                    help="only link OUT/train-plain: the existing renders on plain / gradient backgrounds")
    ap.add_argument("--out", type=Path, default=Path("data/digits"))
    ap.add_argument("--fonts", type=Path, default=Path("data/fonts"), help="where font packages are unpacked (cache)")
    ap.add_argument("--photos", default="data/photos/train", help="background photos (training split only)")
    ap.add_argument("--per-class", type=int, default=1000, help="training images per digit")
    ap.add_argument("--heldout-per-class", type=int, default=100, help="held-out-font images per digit")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", choices=STYLES, default="varied",
                    help="clean: dark ink on plain light colours, large and centred (the bundled generator's data)")
    args = ap.parse_args(argv)
    if args.per_class < 1 or args.heldout_per_class < 0 or args.size < 64:
        ap.error("--per-class >= 1, --heldout-per-class >= 0 and --size >= 64 are required")
    if args.plain_subset:
        if not (args.out / "train").is_dir():
            raise SystemExit(f"error: {args.out}/train does not exist; render the set first: python -m dcae_edge.digits --out {args.out}")
        counts = link_plain_subset(args.out)
        print(f"linked {sum(counts.values())} plain-background renders into {args.out}/train-plain: {counts}")
        return
    try:
        m = build(args.out, args.fonts, args.photos, args.per_class, args.heldout_per_class, args.seed, args.size,
                  style=args.style)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {m['counts']} images; fonts {m['font_counts']}")


if __name__ == "__main__":
    main()
