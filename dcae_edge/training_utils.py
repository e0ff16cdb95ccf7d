"""Pieces shared by the autoencoder and denoiser trainers: devices and precision, DDP set-up,
EMA, atomic checkpoints, loss-curve plots."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .cpu import has_fast_bf16


# ---------------------------------------------------------------------------------------------- devices
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it fast (CUDA with bf16, or AMX / AVX512-BF16 CPUs)."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if has_fast_bf16() else None


# ---------------------------------------------------------------------------------------------- DDP
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) initialise the process group: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers to every rank. On CPU there is no SyncBatchNorm (it needs CUDA): each rank
    updates BatchNorm running stats from its own batch, and DDP only re-broadcasts rank 0's at the
    next forward. Call before checkpoints and at the end so that every replica is rank 0's."""
    if dist.is_initialized():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, 0)


def replicas_identical(model: nn.Module) -> bool:
    """DDP sanity check: every rank holds bit-identical parameters and buffers (compared through
    float64 per-tensor sums gathered from all ranks)."""
    if not dist.is_initialized():
        return True
    state = unwrap(model).state_dict()
    sums = torch.stack([v.detach().double().sum() for v in state.values()]).to(next(iter(state.values())).device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model).state_dict()
        mine = self.model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [src[k].detach() for k in floats], 1 - self.decay)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(src[k])


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Re-estimate BatchNorm running statistics as exact averages over ``batches`` (an iterable of
    input tensors), e.g. for EMA weights whose running stats were averaged separately."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
        m.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return len(bns)


# ---------------------------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary sibling, fsync, rename: a kill mid-write keeps the last good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_training_checkpoint(path: str | Path) -> dict:
    """Our own resume checkpoints hold only tensors and plain Python values: the safe loader suffices."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e}); delete it to restart "
                           "the phase, or restore it from a backup") from None


def config_fingerprint(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def describe_mismatch(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys[:8])


# ---------------------------------------------------------------------------------------------- CLI
def parse_dataclass_args(cls, doc: str, argv=None):
    """One --flag per field of a config dataclass (nanoGPT style: the dataclass is the config)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            ap.add_argument(flag, action="store_true", default=f.default)
        else:
            ap.add_argument(flag, type={"int": int, "float": float}.get(str(f.type), str), default=f.default)
    return cls(**vars(ap.parse_args(argv)))


# ---------------------------------------------------------------------------------------------- plots
def plot_curves(history: list[dict], path: str | Path, title: str, keys: list[str] | None = None) -> None:
    """Loss curves (one panel per key) as a PNG. ``history`` rows hold a ``step`` and metrics."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or [k for k in history[0] if k != "step"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, k in zip(axes[0], keys):
        vals = [h.get(k, float("nan")) for h in history]
        ax.plot(steps, vals, lw=0.8)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_image_grid(rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None,
                    max_width: int = 2048) -> None:
    """Save rows of images ([-1,1] N x 3 x H x W, equal sizes) as one PNG grid, at most
    ``max_width`` pixels wide (reports stay small enough to commit)."""
    from PIL import Image, ImageDraw

    from .data import to_uint8

    grid = torch.cat([torch.cat(list(to_uint8(r.float().cpu())), dim=2) for r in rows], dim=1)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if labels:
        draw = ImageDraw.Draw(img)
        h = rows[0].shape[-2]
        for i, text in enumerate(labels):
            draw.rectangle([0, i * h, 7 * len(text) + 6, i * h + 14], fill=(0, 0, 0))
            draw.text((3, i * h + 1), text, fill=(255, 255, 255))
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.Resampling.LANCZOS)
    img.save(path)
