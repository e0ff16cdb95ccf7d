"""Equivalent forms of DC-AE ops for the backends whose compilers run them faster (the idea of
optimum's ModelPatcher): same weights, same graph I/O, the same values up to float rounding.

The model keeps the forms every backend lowers well. Four of them cost OpenVINO's CPU plugin layout
work it does not need:

* ``pointwise_projections``: LiteMLA's q/k/v and output projections are Linear layers on a
  channels-last view (two permutes around a MatMul, as in diffusers); as 1x1 convolutions on NCHW
  there are no Transposes and no reorders around them;
* ``glu_halves``: GLUMBConv's expansion is split into value and gate halves after the depthwise conv
  (a channel split); computing each half with its own slices of the conv weights gives the same sums
  per output channel (bit for bit in torch) without the VariadicSplit and its reorders;
* ``shortcut_convolutions``: the residual shortcuts are data movement in plain layout, with reorders on
  both sides: the decoder's copy of each channel ``repeats`` times (a Tile), the encoder's pixel_unshuffle
  and mean over channel groups (SpaceToDepth, Reshape, ReduceMean). A grouped convolution with constant
  weights computes the same in the blocked layout of its neighbours: 1x1 with weights of ones for the copy
  (x * 1, exact in every precision); 2x2 with stride 2 and weights 1/g (0 for the taps of another group)
  for the average (g = 2 or 4: exact in bf16 too). calibration.openvino never quantizes these convolutions;
* ``strided_downsample``: a DownBlock's learned path, a 3x3 convolution then pixel_unshuffle (a
  SpaceToDepth between reorders), as one 4x4 stride-2 convolution whose weights hold the 3x3 kernel at
  the four sub-pixel offsets (zeros elsewhere): the same products, 16/9 of the multiply-adds, but 64/9 of
  the weights. So only the narrow high-resolution blocks take it (at most STRIDED_MAX_WEIGHTS): there the
  SpaceToDepth moves the most data for the fewest weights (bundled f64 encoder: the first three of six
  blocks, 3.4 of its 3.6 ms of SpaceToDepth in bf16, for +0.6 MB; all six would add 4.2 MB to a 9.8 MB IR).

On the bundled f64 at 512² (AMD EPYC, AVX-512 bf16/VNNI, no AMX, 2 threads, OpenVINO performance
counters) the first two cut the decoder from 39.4 to 32.2 ms in bf16 and 31.9 to 23.5 ms INT8 + bf16, the
encoder from 31.2 to 29.1 / 26.8 to 22.6 ms; the shortcut convolutions then the bf16 encoder 42.5 -> 31.9 ms
(wall clock, interleaved; the decoder 1-6%). ExecuTorch must not get them: XNNPACK delegates only
convolutions whose weights are parameters, and a conv on a slice of one ran outside it (the decoder
0.22 -> 7 s). So a backend asks for forms by name around its tracing (``with graph_forms(module, ...)``)
and records them in its manifest entry; the model itself is untouched afterwards.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcae_edge.autoencoder import Decoder, DownBlock, Encoder, GLUMBConv, LiteMLA, UpBlock


def pointwise(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A bias-free Linear over the channels of an NCHW tensor, as a 1x1 convolution."""
    return F.conv2d(x, linear.weight[:, :, None, None])


def glu_halves(block: GLUMBConv, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GLUMBConv.value_and_gate with each half computed by its own slices of the conv weights."""
    inv, dw = block.conv_inverted, block.conv_depth
    hidden = inv.out_channels // 2

    def half(part: slice) -> torch.Tensor:
        y = F.silu(F.conv2d(x, inv.weight[part], inv.bias[part]))
        return F.conv2d(y, dw.weight[part], dw.bias[part], padding=dw.padding, groups=hidden)

    return half(slice(0, hidden)), half(slice(hidden, 2 * hidden))


def duplicate_by_convolution(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """duplicate_channels (each channel ``repeats`` times, in place) as a grouped 1x1 convolution of ones."""
    channels = int(x.shape[1])
    return F.conv2d(x, torch.ones(channels * repeats, 1, 1, 1, dtype=x.dtype), groups=channels)


def average_by_convolution(x: torch.Tensor, out_channels: int, factor: int = 2) -> torch.Tensor:
    """space_to_channel_average (pixel_unshuffle(factor), then the mean of each run of g consecutive channels)
    as one grouped convolution, factor x factor with that stride; factor 1: channel_average."""
    c_in, taps = int(x.shape[1]), factor * factor
    g = c_in * taps // out_channels  # unshuffled channels averaged into one output
    groups = min(c_in, out_channels)
    c_in_per_group, c_out_per_group = c_in // groups, out_channels // groups
    o = np.arange(out_channels)[:, None, None, None]
    j = np.arange(c_in_per_group)[None, :, None, None]
    tap = np.arange(factor)[:, None] * factor + np.arange(factor)[None, :]  # pixel_unshuffle's channel order
    channel = (o // c_out_per_group) * c_in_per_group + j  # input channel j of o's group
    weight = np.where((channel * taps + tap) // g == o, 1.0 / g, 0.0).astype(np.float32)
    return F.conv2d(x, torch.from_numpy(weight).to(x.dtype), stride=factor, groups=groups)


STRIDED_MAX_WEIGHTS = 1 << 17  # elements of a 4x4 strided weight (512 KB in f32)


def strides_cheaply(m: nn.Module) -> bool:
    """A DownBlock whose conv3x3 + pixel_unshuffle becomes a strided conv of at most STRIDED_MAX_WEIGHTS."""
    # the strided weight: 4x the output channels (one per sub-pixel), 4x4 taps
    return isinstance(m, DownBlock) and m.pixel_unshuffle and 4 * m.conv.out_channels * m.conv.in_channels * 16 <= STRIDED_MAX_WEIGHTS


def strided_downsample(block: DownBlock, x: torch.Tensor) -> torch.Tensor:
    """DownBlock.downsample, pixel_unshuffle(conv3x3(x), 2), as one 4x4 stride-2 convolution: output channel
    4c + 2dy + dx is channel c of the 3x3 convolution at sub-pixel (dy, dx), i.e. its kernel shifted by (dy, dx)."""
    w, b = block.conv.weight, block.conv.bias
    shifted = [F.pad(w, (dx, 1 - dx, dy, 1 - dy)) for dy in range(2) for dx in range(2)]  # [c, c_in, 4, 4] each
    w4 = torch.stack(shifted, dim=1).reshape(4 * w.shape[0], w.shape[1], 4, 4)
    return F.conv2d(x, w4, b.repeat_interleave(4), stride=2, padding=1)


def shortcut_convolution(m: nn.Module) -> tuple[str, Callable] | None:
    if isinstance(m, UpBlock) and m.shortcut or isinstance(m, Decoder) and m.in_shortcut:
        return "duplicate_channels", duplicate_by_convolution
    if isinstance(m, DownBlock) and m.shortcut:
        return "space_to_channel_average", average_by_convolution
    if isinstance(m, Encoder) and m.out_shortcut:
        return "channel_average", functools.partial(average_by_convolution, factor=1)
    return None


# form name -> for a submodule: None if the form does not touch it, else (method replaced, replacement)
FORMS: dict[str, Callable[[nn.Module], tuple[str, Callable] | None]] = {
    "pointwise_projections": lambda m: ("project", pointwise) if isinstance(m, LiteMLA) else None,
    "glu_halves": lambda m: ("value_and_gate", functools.partial(glu_halves, m)) if isinstance(m, GLUMBConv) else None,
    "shortcut_convolutions": shortcut_convolution,
    "strided_downsample": lambda m: ("downsample", functools.partial(strided_downsample, m)) if strides_cheaply(m) else None,
}


def forms_in(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The named forms that change something in ``module`` (what a manifest records: a denoiser without
    LiteMLA or GLUMBConv blocks, or a graph without shortcuts, was traced in the model's own forms)."""
    return [n for n in names if any(FORMS[n](sub) for sub in module.modules())]


@contextlib.contextmanager
def graph_forms(module: nn.Module, names: tuple[str, ...]) -> Iterator[int]:
    """Inside the block, ``module``'s submodules compute with the named forms; yields how many
    submodules changed. Restored on exit, also when tracing fails."""
    unknown = sorted(set(names) - set(FORMS))
    if unknown:
        raise ValueError(f"unknown graph forms {unknown}; known: {sorted(FORMS)}")
    patched = []
    try:
        for name in names:
            for sub in module.modules():
                swap = FORMS[name](sub)
                if swap and swap[0] not in vars(sub):
                    setattr(sub, *swap)  # an instance attribute shadows the class's method
                    patched.append((sub, swap[0]))
        yield len(patched)
    finally:
        for sub, method in patched:
            delattr(sub, method)
