"""Image helpers for apps: files / PIL / uint8 arrays <-> float NCHW in [-1, 1] (numpy + Pillow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _fix_for_mode(mode: str) -> str:
    return {"RGBA": "img.convert('RGB') (alpha is dropped) or composite it on a background first",
            "LA": "img.convert('RGB')", "L": "img.convert('RGB') (greyscale is replicated to 3 channels)",
            "P": "img.convert('RGB')", "CMYK": "img.convert('RGB')", "I;16": "scale to 8 bits, then img.convert('RGB')"
            }.get(mode, "img.convert('RGB')")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def expand_inputs(paths: list[str]) -> list[Path]:
    """Image files as given, folders expanded to the images they hold (sorted); clear errors."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                subs = sorted(d.name for d in p.iterdir() if d.is_dir() and any(
                    f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*")))
                hint = (f"; images are further down, in {', '.join(subs)}: pass image files or the folders that hold them "
                        "(folders are not searched recursively)") if subs else ""
                raise ValueError(f"{p} is a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))}){hint}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return out


def out_paths(out: str | Path, names: list[str]) -> list[Path]:
    """One convention for every CLI: ``--out`` ending in an image extension is one file (then only
    one image may be written), anything else a folder receiving ``names``."""
    out = Path(out)
    if out.suffix.lower() in IMAGE_SUFFIXES:
        if len(names) != 1:
            raise ValueError(f"--out {out} names one file but {len(names)} images would be written; pass a folder")
        if out.is_dir():
            raise ValueError(f"--out {out} is an existing folder; pass a file name that is not a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        return [out]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return [out / n for n in names]


def load_image(path: str | Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as uint8 H x W x 3. ``size`` centre-crops and resizes (int = square)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P"):
            bg = Image.new("RGB", img.size, (255, 255, 255))  # files: composite alpha on white, say so in docs
            bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
            img = bg
        else:
            img = img.convert("RGB")
    if size is not None:
        th, tw = (size, size) if isinstance(size, int) else size
        scale = max(th / img.height, tw / img.width)
        img = img.resize((max(tw, round(img.width * scale)), max(th, round(img.height * scale))), Image.Resampling.BICUBIC)
        left, top = (img.width - tw) // 2, (img.height - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    return np.asarray(img, dtype=np.uint8)


def as_model_input(images) -> np.ndarray:
    """PIL image(s), uint8 HWC / NHWC arrays, or float NCHW in [-1, 1] -> float32 NCHW in [-1, 1]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        arrays = []
        for im in images:
            if Image is not None and isinstance(im, Image.Image):
                if im.mode != "RGB":
                    raise ValueError(f"image mode {im.mode!r} is not RGB; convert it first: {_fix_for_mode(im.mode)}")
                im = np.asarray(im, dtype=np.uint8)
            arrays.append(np.asarray(im))
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"images in one batch must share a size, got {sorted({a.shape for a in arrays})}; "
                             "resize them (load_image(path, size=...)) or call encode per image")
        images = np.stack(arrays)
    x = np.asarray(images)
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"uint8 images must be H x W x 3 or N x H x W x 3, got {x.shape}")
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images have {x.shape[-1]} channels; RGB (3) is needed: "
                             + ("drop the alpha channel (x[..., :3])" if x.shape[-1] == 4 else "repeat the grey channel"))
        return (x.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()
    if x.dtype.kind != "f":
        raise ValueError(f"images must be uint8 (0..255) or float in [-1, 1], got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float images must be N x 3 x H x W in [-1, 1], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or Inf")
    if x.min() < -1.01 or x.max() > 1.01:
        raise ValueError(f"float images must lie in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]; for 0..1 use 2*x-1")
    return x.astype(np.float32, copy=False)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return np.clip(np.round((np.asarray(images) + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None) -> None:
    from PIL import Image

    tiles = to_uint8(images)
    n, h, w, _ = tiles.shape
    cols = columns or n
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, t in enumerate(tiles):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = t
    Image.fromarray(grid).save(path)
