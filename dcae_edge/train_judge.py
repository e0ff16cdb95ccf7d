"""Train the digit judge on real renders of the *training* fonts only; report its accuracy on
renders of the held-out fonts; export it to ONNX (the bundled judge, < 1 MB).

    python -m dcae_edge.train_judge --data data/digits --out dcae_edge/weights/digit-judge

It never sees a generated image. Augmentations (blur, noise, small shifts) make it read the soft
strokes a decoder produces without training on them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .judge import INPUT_SIZE, to_judge_input
from .training_utils import parse_dataclass_args


@dataclass
class JudgeConfig:
    data: str = "data/digits"
    out: str = "dcae_edge/weights/digit-judge"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 24
    input_size: int = 64            # pixels the judge reads (128 with a strided stem: 96.4% after 18 epochs, not better yet)
    max_shear: float = 0.35         # horizontal shear per image, up to ~19 degrees either way (italics)
    affine_p: float = 0.7           # share of batches that get rotation / scale / shear
    extra_renders: int = 0          # more training-font renders beyond the dataset's (indices after it)
    fonts: str = "data/fonts"
    photos: str = "data/photos/train"
    seed: int = 0


class DigitNet(nn.Module):
    """Four conv-BN-ReLU stages (64 -> 8 px), global average pool, linear: ~0.14 M parameters.
    Larger inputs enter through a strided first convolution, so the rest costs the same as at 64 px."""

    def __init__(self, width: int = 24, classes: int = 10, stem_stride: int = 1):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i in range(4):
            stride = stem_stride if i == 0 else 1
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3 if stride == 1 else 2 * stride + 1, stride=stride,
                                 padding=1 if stride == 1 else stride, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], classes)

    def forward(self, image):
        return self.head(self.features(image).mean((2, 3)))


def load_split(root: Path, split: str, size: int = INPUT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted((root / split).glob("*/*.jpg"))
    if not files:
        raise FileNotFoundError(f"{root / split}: no images (render them: python -m dcae_edge.digits --out {root})")
    xs, ys = [], []
    for i in tqdm(range(0, len(files), 256), desc=f"loading {split}", dynamic_ncols=True):
        chunk = files[i:i + 256]
        xs.append(torch.from_numpy(to_judge_input([Image.open(f) for f in chunk], size)))
        ys += [int(f.parent.name) for f in chunk]
    return torch.cat(xs), torch.tensor(ys)


def render_extra(cfg: "JudgeConfig", start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh renders of the training fonts (same renderer and seed, indices after the dataset's)."""
    from .digits import all_fonts, load_background_photos, render_sample

    fonts = all_fonts(Path(cfg.fonts))
    photos, _ = load_background_photos(cfg.photos)
    xs, ys = [], []
    for i in tqdm(range(start, start + cfg.extra_renders), desc="rendering extra", dynamic_ncols=True):
        img, _ = render_sample(i, "train", fonts, photos)
        xs.append(to_judge_input(img, cfg.input_size))
        ys.append(i % 10)
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys)


def augment(x: torch.Tensor, g: torch.Generator, max_shear: float = 0.0, affine_p: float = 0.5) -> torch.Tensor:
    """Blur (a decoder's soft strokes), small shifts, rotations, shears (the held-out fonts' errors were
    nearly all italics and obliques), brightness/contrast, noise."""
    n, size = x.shape[0], x.shape[-1]
    k = size // 64  # augmentation strengths are set in 64 px units
    sigma = torch.rand(n, generator=g) * 1.5 * k
    r = torch.arange(-3 * k, 3 * k + 1, dtype=torch.float32)
    kern = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    xb = x.reshape(1, n * 3, size, size)
    w = kern.repeat_interleave(3, 0)
    pad = 3 * k
    xb = F.conv2d(F.pad(xb, (pad, pad, 0, 0), mode="replicate"), w[:, None, None, :], groups=n * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, pad, pad), mode="replicate"), w[:, None, :, None], groups=n * 3)
    x = xb.reshape(n, 3, size, size)
    shift = torch.randint(-3 * k, 3 * k + 1, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    if torch.rand(1, generator=g).item() < affine_p:  # rotations, scalings and shears (italics) per image
        ang = (torch.rand(n, generator=g) - 0.5) * 0.3
        sc = 1 + (torch.rand(n, generator=g) - 0.5) * 0.2
        shear = (torch.rand(n, generator=g) - 0.5) * 2 * max_shear
        theta = torch.stack([torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang) + shear, torch.zeros(n)], 1),
                             torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    a = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    b = 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return (x * a + b + 0.03 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).float().mean())


def train(cfg: JudgeConfig) -> dict:
    if cfg.input_size % 64:
        raise ValueError(f"--input-size {cfg.input_size}: a multiple of 64 (the network after its stem works at 64 px)")
    torch.manual_seed(cfg.seed)
    root = Path(cfg.data)
    xtr, ytr = load_split(root, "train", cfg.input_size)
    if cfg.extra_renders:
        xe, ye = render_extra(cfg, len(xtr))
        xtr, ytr = torch.cat([xtr, xe]), torch.cat([ytr, ye])
    xho, yho = load_split(root, "heldout", cfg.input_size)
    model = DigitNet(cfg.width, stem_stride=cfg.input_size // 64)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (len(xtr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    g = torch.Generator().manual_seed(cfg.seed)
    t0, history = time.time(), []
    bar = tqdm(total=steps, desc="judge", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], g, cfg.max_shear, cfg.affine_p)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        acc = accuracy(model, xho, yho)
        history.append({"epoch": epoch + 1, "loss": round(loss.item(), 4), "heldout_accuracy": round(acc, 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{acc:.4f}")
    bar.close()
    result = {"train_accuracy": round(accuracy(model, xtr, ytr), 4), "heldout_accuracy": round(accuracy(model, xho, yho), 4),
              "train_images": len(xtr), "heldout_images": len(xho), "epochs": cfg.epochs, "seconds": round(time.time() - t0),
              "parameters": sum(p.numel() for p in model.parameters()), "history": history}
    export(model.eval(), Path(cfg.out), cfg, result, root)
    return result


def export(model: nn.Module, out: Path, cfg: JudgeConfig, result: dict, data: Path) -> None:
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = out.with_suffix(".onnx")
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    torch.onnx.export(model, (torch.zeros(2, 3, cfg.input_size, cfg.input_size),), str(tmp), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, opset_version=17)
    onnx.checker.check_model(str(tmp))
    tmp.replace(onnx_path)
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").is_file() else {}
    meta = {"class_names": [str(i) for i in range(10)], "input": f"image: N x 3 x {cfg.input_size} x {cfg.input_size} in [-1, 1], "
            "RGB, resized with Pillow's bilinear filter (dcae_edge.judge.to_judge_input)", "output": "logits: N x 10", "input_size": cfg.input_size,
            "trained_on": f"{data} train split (training fonts only, {result['train_images']} renders); never generated images",
            "heldout_fonts": manifest.get("heldout_packages"), "config": cfg.__dict__, **result}
    from .judge import Judge, fresh_render_accuracy

    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))  # Judge reads its input size from it
    # what tests/test_digits.py re-checks: fresh renders of matplotlib's (held-out) fonts
    meta["fresh_render_accuracy"] = round(fresh_render_accuracy(Judge(onnx_path)), 4)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))


def main(argv=None):
    train(parse_dataclass_args(JudgeConfig, __doc__, argv))


if __name__ == "__main__":
    main()
