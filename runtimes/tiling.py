"""Tiled application of a fixed-size graph to larger inputs: overlapping tiles, linear blending.

An exported decoder has no ``enable_tiling`` (the diffusers switch lives in Python), so tiling
lives here, around every backend. Tiles are always full-size (the last one is moved flush with
the edge), which also suits static graphs."""
from __future__ import annotations

from typing import Callable

import numpy as np


def tile_starts(total: int, tile: int, overlap: int) -> list[int]:
    if total <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, total - tile, stride))
    return starts + [total - tile]


def ramp(n: int, width: int) -> np.ndarray:
    """Weights rising linearly over ``width`` cells at both ends (never zero)."""
    i = np.arange(n)
    return np.clip(np.minimum(i + 1, n - i) / (width + 1), 1e-3, 1.0).astype(np.float32)


def tiled_apply(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, overlap: int, scale: float) -> np.ndarray:
    """Apply ``fn`` (NCHW -> NCHW, spatial size x ``scale``) over overlapping ``tile`` x ``tile``
    windows of ``x`` and blend the outputs by weighted averaging."""
    n, _, h, w = x.shape
    out = weight = None
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            y = fn(np.ascontiguousarray(x[:, :, top:top + tile, left:left + tile]))
            th, tw = y.shape[-2:]
            if out is None:
                out = np.zeros((n, y.shape[1], round(h * scale), round(w * scale)), dtype=np.float32)
                weight = np.zeros((round(h * scale), round(w * scale)), dtype=np.float32)
            ov = max(1, round(overlap * scale))
            wgt = ramp(th, ov)[:, None] * ramp(tw, ov)[None, :]
            t, l = round(top * scale), round(left * scale)
            out[:, :, t:t + th, l:l + tw] += y * wgt
            weight[t:t + th, l:l + tw] += wgt
    return out / weight
