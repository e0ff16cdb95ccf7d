"""Image data: an ImageFolder-style photo set with random crops for training and deterministic
crops for evaluation. Images live in memory as uint8 tensors (the photo sets here are small), so
a batch of random crops is sampled from a seeded generator: step ``s`` of rank ``r`` always sees
the same crops, which makes resumed and distributed runs reproducible without saving RNG state.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 CHW tensor (RGB)."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def center_crop_resize(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Deterministic evaluation crop: resize (antialiased) so the image covers ``size`` (an int for
    a square, or (height, width)), then centre crop."""
    th, tw = (size, size) if isinstance(size, int) else size
    _, h, w = img.shape
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=scale < 1, align_corners=False)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[:, top:top + th, left:left + tw].clamp(0, 255).round().to(torch.uint8)


class ImageFolder:
    """Images under ``root`` (recursively). First-level sub-folders are classes when every image
    sits in one; otherwise the set is unconditional (all labels 0, ``num_classes == 0``).

    Unreadable or too-small images are skipped and counted in ``self.skipped``.
    """

    def __init__(self, root: str | Path, min_side: int = 64, max_side: int | None = 768):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; build one with "
                                    "`python -m dcae_edge.photos --out data/photos` or point to your own images")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        subdirs = sorted({p.relative_to(self.root).parts[0] for p in files if len(p.relative_to(self.root).parts) > 1})
        top_level_files = [p for p in files if len(p.relative_to(self.root).parts) == 1]
        self.classes = subdirs if subdirs and not top_level_files else []
        self.images, self.labels, self.paths, self.skipped = [], [], [], []
        for p in files:
            try:
                with Image.open(p) as im:
                    im.load()
                    if min(im.size) < min_side:
                        self.skipped.append((str(p), f"smaller than {min_side}px"))
                        continue
                    if max_side and min(im.size) > max_side:
                        s = max_side / min(im.size)
                        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
                    t = pil_to_tensor(im)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped with its reason
                self.skipped.append((str(p), f"unreadable: {type(e).__name__}"))
                continue
            self.images.append(t)
            self.paths.append(p)
            self.labels.append(self.classes.index(p.relative_to(self.root).parts[0]) if self.classes else 0)
        if not self.images:
            raise ValueError(f"no usable images in {self.root} ({len(files)} files, {len(self.skipped)} skipped: "
                             f"{self.skipped[:3]})")
        if self.skipped:
            print(f"ImageFolder {self.root}: skipped {len(self.skipped)} of {len(files)} files "
                  f"(unreadable or smaller than {min_side}px)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p, t in zip(self.paths, self.images):
            h.update(str(p.relative_to(self.root)).encode())
            h.update(str(tuple(t.shape)).encode())
        return h.hexdigest()[:16]

    def to(self, device) -> "ImageFolder":
        """Keep the decoded images on ``device`` (crops are then cut and resized there)."""
        self.images = [t.to(device) for t in self.images]
        return self

    def balanced_weights(self) -> torch.Tensor:
        """Per-image sampling weights 1 / sqrt(images in its sub-folder): a large collection (213
        nebula photos) does not dominate, a small one is not repeated to death."""
        labels = torch.tensor(self.labels)
        counts = torch.bincount(labels).double()
        w = 1.0 / counts[labels].sqrt()
        return w / w.sum()

    def random_crops(self, n: int, size: int, generator: torch.Generator, min_scale: float = 0.5,
                     flip: bool = True, balance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random crops (uint8, N x 3 x size x size, on the images' device) and their labels.

        Each crop covers a random square of side in [min_scale, 1] x short side of a random image,
        resized to ``size`` with antialiasing, randomly mirrored (``flip``); images drawn uniformly or,
        with ``balance``, by ``balanced_weights``. The random numbers come from the
        CPU ``generator`` only, so crops are identical on every device.
        """
        device = self.images[0].device
        out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
        labels = torch.empty(n, dtype=torch.long)
        idx = (torch.multinomial(self.balanced_weights(), n, replacement=True, generator=generator) if balance
               else torch.randint(len(self.images), (n,), generator=generator))
        u = torch.rand(n, 4, generator=generator)
        for i in range(n):
            img = self.images[idx[i]]
            _, h, w = img.shape
            side = int(min(h, w) * (min_scale + (1 - min_scale) * u[i, 0].item()))
            side = max(side, min(size, h, w))
            top = int((h - side) * u[i, 1].item())
            left = int((w - side) * u[i, 2].item())
            crop = img[:, top:top + side, left:left + side].float()[None]
            if side != size:
                crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=side > size, align_corners=False)
            crop = crop[0].clamp(0, 255).round().to(torch.uint8)
            if flip and u[i, 3] < 0.5:
                crop = crop.flip(-1)
            out[i] = crop
            labels[i] = self.labels[idx[i]]
        return out, labels

    def eval_crops(self, size: int, limit: int | None = None) -> torch.Tensor:
        """Deterministic centre crops of every image (uint8)."""
        imgs = self.images[:limit] if limit else self.images
        return torch.stack([center_crop_resize(t.cpu(), size) for t in imgs])


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The RNG for one training step: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63))


ASSET_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def sample_photos(size: int | tuple[int, int] = 256, n: int = 4) -> torch.Tensor:
    """Real photos bundled with the package (public domain / CC0, see assets/LICENSES.md),
    centre-cropped to ``size``: float N x 3 x H x W in [-1, 1]. Export validation and tests use
    these so that no check relies on random noise alone (noise hides the eps-folding NaN)."""
    assets = Path(__file__).parent / "assets"
    imgs = [pil_to_tensor(Image.open(assets / f"{name}.jpg")) for name in ASSET_PHOTOS]
    imgs = (imgs * n)[:n]
    return to_model_range(torch.stack([center_crop_resize(t, size) for t in imgs]))
