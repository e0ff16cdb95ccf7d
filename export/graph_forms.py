"""Equivalent forms of DC-AE ops for the backends whose compilers run them faster or more precisely (the
idea of optimum's ModelPatcher): same weights, same graph I/O, the same values up to float rounding.

The model keeps the forms every backend lowers well. Five of them cost OpenVINO's CPU plugin layout
work it does not need, five leave ops outside ExecuTorch's XNNPACK delegate, and one keeps OpenVINO's bf16
from rounding the decoder's output norm (the last five bullets below):

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
* ``shortcuts_in_weights``: where a block's shortcut reads the same input pixels as its learned convolution,
  it is that convolution with more weights: an up block's copy (conv3x3(x) + copies of x, then pixel_shuffle)
  is 1 added to the centre tap of each output channel's source channel; a down block's average sits inside
  the 4x4 strided form's (or SANA's 3x3 stride-2) window. One convolution then replaces convolution, shortcut
  convolution and Add (bundled f64, dynamic IRs interleaved: bf16 encoder -10%, decoder -4..-8%; INT8 + bf16
  decoder 31.0 -> 25.9 ms, encoder 24.0 -> 22.0 ms). Exact in f32 up to rounding (bf16: 64.9 / 59.6 dB). The cost
  is INT8's: the 1 sets those channels' weight scale, so their other weights quantize ~10x coarser (INT8
  decoder 49.2 -> 41.6 dB vs fp32, end-to-end reconstruction loss 0.027 -> 0.077 dB, gate 0.3 dB); so a block
  folds only while that step grows at most FOLD_MAX_STEP_GROWTH (random-init paper-size weights would not).

* ``channel_mean_by_convolution`` (ExecuTorch's INT8 program's): RMSNorm2d's mean over channels as a 1x1 convolution with
  weights 1/C, held as a constant (a tensor made inside forward would be an op, not a weight, and run outside
  XNNPACK). XNNPACK reduces only over spatial dims, so the mean ran outside the delegate, cutting each
  GLUMBConv and attention block in two (bundled f64 decoder: 37 delegates -> 28); and a quantized convolution
  whose output left the delegate there came back in the wrong layout (ExecuTorch 1.4: "Attempted to resize a
  static tensor. Expected shape (1, 256, 2, 2), but received (1, 2, 256, 2)"). Same sums up to rounding.
* ``softmax_attention`` and ``layer_norm_by_means`` (ExecuTorch's): the denoiser's attention as softmax(q k^T /
  sqrt(d)) v written out with 3-D batched matmuls, and its LayerNorms as means over the last two axes of a trailing-1
  view. torch.export decomposes scaled_dot_product_attention with a "safe softmax" for fully masked rows (eq,
  logical_not, any, full_like, where per block) and scales q and k apart (mul.Scalar); a 4-D matmul becomes expand +
  bmm; and XNNPACK takes neither native_layer_norm nor a mean over one axis of a 3-D tensor: all of that ran outside
  the delegate. With both forms the bundled transformer's fp32 program keeps 32 ops outside instead of 131 (10
  delegates instead of 39), and a CFG step (batch 2) takes 4.6 instead of 8.8 ms (Intel Xeon with AMX, 2 threads);
  no mask is ever passed, so the attention is the same function.
* ``qkv_slices`` (ExecuTorch's): the denoiser's q, k and v as three slices of the fused projection's output instead
  of indexing its [3, b, heads, n, d] permute, which exports as select_copy, outside XNNPACK (three per block, each a
  boundary between delegates). The bundled transformer's fp32 program: 3 delegates instead of 10, 11 ops outside
  instead of 32, a CFG step 4.70-4.93 instead of 4.82-5.06 ms (three interleaved rounds, Intel Xeon with AMX).
* ``glu_slices`` (ExecuTorch's fp32 programs): GLUMBConv's value and gate as two channel slices instead of ``chunk``
  (a split_with_sizes_copy outside XNNPACK in every block). Bundled f64 at 512², Intel Xeon with AMX, 2 threads:
  decoder 35 -> 31 delegates, 105.8 -> 96.9 ms, encoder 108.4 -> 100.3 ms, peak RSS +15-21 MB (the decoder, of ~500);
  bit for bit the same values. The INT8 programs do not take it: ExecuTorch 1.4 aborted loading such an INT8
  encoder (heap corruption in load_method).
* ``fused_output_norm`` (OpenVINO's; a precision form, not a layout one): the decoder's last RMSNorm, the one
  right before the output convolution, on a channels-last view. OpenVINO fuses a norm over the last axis into one
  RMS op that computes in f32 inside, also under the bf16 hint; over the channels of NCHW it stays Power,
  ReduceMean, Sqrt and Divide, each output rounded to bf16. This was what kept optimum's IR (diffusers normalizes
  channels-last) ~2 dB closer to torch under bf16. Only that norm counts: on the blocks' norms the fused op gained
  nothing and each costs two Transposes (bundled f64 decoder, bf16, 10 photos at 512², Intel Xeon with AMX: min
  57.7 -> 59.7 dB PSNR vs torch, optimum's IR 59.6; scripts/compare_optimum_openvino.py). The cost, at static
  shapes as the runtime compiles them: bf16 +7% (the two Transposes), f32 +1.5%, INT8 + bf16 level.

On the bundled f64 at 512² (AMD EPYC, AVX-512 bf16/VNNI, no AMX, 2 threads, OpenVINO performance
counters) the first two cut the decoder from 39.4 to 32.2 ms in bf16 and 31.9 to 23.5 ms INT8 + bf16, the
encoder from 31.2 to 29.1 / 26.8 to 22.6 ms; the shortcut convolutions then the bf16 encoder 42.5 -> 31.9 ms
(wall clock, interleaved; the decoder 1-6%). ExecuTorch must not get those five: XNNPACK delegates only
convolutions whose weights are parameters or constants, and a conv on a slice of one ran outside it (the
decoder 0.22 -> 7 s). So a backend asks for forms by name around its tracing (``with graph_forms(module, ...)``)
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

from dcae_edge.autoencoder import Decoder, DownBlock, Encoder, GLUMBConv, LiteMLA, RMSNorm2d, UpBlock
from dcae_edge.denoiser import Attention


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


def glu_slices(block: GLUMBConv, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GLUMBConv.value_and_gate with the halves cut as two channel slices (``chunk`` exports as
    split_with_sizes_copy, which XNNPACK does not take)."""
    y = block.conv_depth(F.silu(block.conv_inverted(x)))
    half = y.shape[1] // 2
    return y[:, :half], y[:, half:]


def mean_square_by_convolution(mean_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm2d.mean_square as a 1x1 convolution of ``mean_weight`` (1/C each)."""
    return F.conv2d(x.float().pow(2), mean_weight)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention without a mask, written out with 3-D batched matmuls (a 4-D ``@`` is exported
    as expand + bmm, and the expands ran outside XNNPACK)."""
    b, h, n, d = q.shape
    scores = torch.bmm((q * d ** -0.5).reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2))
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * h, n, d)).reshape(b, h, n, d)


def qkv_slices(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward with q, k and v cut from the fused projection as three slices of its last axis; the model
    indexes the [3, b, heads, n, d] permute, exported as select_copy, which XNNPACK does not take (three per block)."""
    b, n, c = x.shape
    qkv = attention.qkv(x)
    q, k, v = (qkv[:, :, i * c:(i + 1) * c].reshape(b, n, attention.heads, c // attention.heads).transpose(1, 2)
               for i in range(3))
    return attention.proj(attention.attend(q, k, v).transpose(1, 2).reshape(b, n, c))


def layer_norm_by_means(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm over the last axis as means over the last two axes of a trailing-1 view (XNNPACK reduces over
    those), centred first as LayerNorm's own two-pass variance is."""
    x4 = x.unsqueeze(-1)
    centred = x4 - x4.mean(dim=(-2, -1), keepdim=True)
    y = (centred * torch.rsqrt((centred * centred).mean(dim=(-2, -1), keepdim=True) + norm.eps)).reshape(x.shape)
    if norm.weight is not None:
        y = y * norm.weight
    return y + norm.bias if norm.bias is not None else y


def rms_norm_channels_last(norm: RMSNorm2d, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm2d on a channels-last view: a norm over the last axis, which OpenVINO fuses into one RMS op."""
    y = x.permute(0, 2, 3, 1)
    y = y * torch.rsqrt(y.float().pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return (y * norm.weight + norm.bias).permute(0, 3, 1, 2)


def channel_mean_weight(norm: RMSNorm2d) -> torch.Tensor:
    channels = norm.weight.numel()
    return torch.full((1, channels, 1, 1), 1.0 / channels, dtype=norm.weight.dtype)


def duplicate_by_convolution(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """duplicate_channels (each channel ``repeats`` times, in place) as a grouped 1x1 convolution of ones."""
    channels = int(x.shape[1])
    return F.conv2d(x, torch.ones(channels * repeats, 1, 1, 1, dtype=x.dtype), groups=channels)


def average_weights(out_channels: int, in_channels: int, factor: int = 2) -> np.ndarray:
    """space_to_channel_average as the dense weights of a factor x factor convolution with that stride:
    unshuffled channel i * factor² + tap goes to output (i * factor² + tap) // g with weight 1/g."""
    taps = factor * factor
    g = in_channels * taps // out_channels
    o = np.arange(out_channels)[:, None, None, None]
    i = np.arange(in_channels)[None, :, None, None]
    tap = np.arange(factor)[:, None] * factor + np.arange(factor)[None, :]  # pixel_unshuffle's channel order
    return np.where((i * taps + tap) // g == o, 1.0 / g, 0.0).astype(np.float32)


def average_by_convolution(x: torch.Tensor, out_channels: int, factor: int = 2) -> torch.Tensor:
    """space_to_channel_average (pixel_unshuffle(factor), then the mean of each run of g consecutive channels)
    as one grouped convolution, factor x factor with that stride; factor 1: channel_average. Its weights are
    average_weights' columns of each output's group (an output averages input channels of its group only)."""
    c_in = int(x.shape[1])
    groups = min(c_in, out_channels)
    c_in_per_group, c_out_per_group = c_in // groups, out_channels // groups
    o = np.arange(out_channels)[:, None]
    channel = (o // c_out_per_group) * c_in_per_group + np.arange(c_in_per_group)[None, :]  # input channel j of o's group
    weight = average_weights(out_channels, c_in, factor)[o, channel]  # [out, c_in / groups, factor, factor]
    return F.conv2d(x, torch.from_numpy(weight).to(x.dtype), stride=factor, groups=groups)


STRIDED_MAX_WEIGHTS = 1 << 17  # elements of a 4x4 strided weight (512 KB in f32)


def strides_cheaply(m: nn.Module) -> bool:
    """A DownBlock whose conv3x3 + pixel_unshuffle becomes a strided conv of at most STRIDED_MAX_WEIGHTS."""
    # the strided weight: 4x the output channels (one per sub-pixel), 4x4 taps
    return isinstance(m, DownBlock) and m.pixel_unshuffle and 4 * m.conv.out_channels * m.conv.in_channels * 16 <= STRIDED_MAX_WEIGHTS


def strided_weights(block: DownBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4x4 stride-2 (padding 1) weights and bias of pixel_unshuffle(conv3x3(x), 2): output channel
    4c + 2dy + dx is channel c of the 3x3 convolution at sub-pixel (dy, dx), i.e. its kernel shifted by (dy, dx)."""
    w, b = block.conv.weight, block.conv.bias
    shifted = [F.pad(w, (dx, 1 - dx, dy, 1 - dy)) for dy in range(2) for dx in range(2)]  # [c, c_in, 4, 4] each
    return torch.stack(shifted, dim=1).reshape(4 * w.shape[0], w.shape[1], 4, 4), b.repeat_interleave(4)


def strided_downsample(block: DownBlock, x: torch.Tensor) -> torch.Tensor:
    """DownBlock.downsample as one 4x4 stride-2 convolution (strided_weights)."""
    w, b = strided_weights(block)
    return F.conv2d(x, w, b, stride=2, padding=1)


def copy_weights(out_channels: int, in_channels: int, kernel: int) -> np.ndarray:
    """duplicate_channels (output channel o = input channel o // repeats) as the centre tap of a
    kernel x kernel convolution's weights (stride 1, 'same' padding)."""
    w = np.zeros((out_channels, in_channels, kernel, kernel), np.float32)
    o = np.arange(out_channels)
    w[o, o // (out_channels // in_channels), kernel // 2, kernel // 2] = 1.0
    return w


def up_with_shortcut_in_weights(block: UpBlock, x: torch.Tensor) -> torch.Tensor:
    """UpBlock.forward, pixel_shuffle(conv3x3(x) + duplicate_channels(x)), with the copy added to the centre tap
    of the conv's weights: one convolution, no shortcut, no Add (x * (w + 1) = x * w + x up to rounding)."""
    w = block.conv.weight
    out_channels, in_channels, kernel = (int(d) for d in w.shape[:3])  # ints, also while tracing
    copy = copy_weights(out_channels, in_channels, kernel)
    return F.pixel_shuffle(F.conv2d(x, w + torch.from_numpy(copy).to(w.dtype), block.conv.bias, padding=kernel // 2), 2)


def down_with_shortcut_in_weights(block: DownBlock, x: torch.Tensor) -> torch.Tensor:
    """DownBlock.forward with space_to_channel_average added to the weights of the stride-2 learned path (the
    4x4 strided_downsample, or SANA's 3x3 stride-2 conv): with padding 1, output (p, q) reads input rows and columns
    2p-1 .. and the average's 2x2 cell 2p, 2p+1 sits at taps 1 and 2 of either kernel."""
    if block.pixel_unshuffle:
        w, b = strided_weights(block)
    else:
        w, b = block.conv.weight, block.conv.bias
    average = np.zeros(tuple(int(d) for d in w.shape), np.float32)  # ints, also while tracing
    average[:, :, 1:3, 1:3] = average_weights(*average.shape[:2])
    return F.conv2d(x, w + torch.from_numpy(average).to(w.dtype), b, stride=2, padding=1)


# INT8 quantizes weights per output channel, so the value a fold adds (1 for a copy, 1/g for an average) sets
# the step of those channels' learned weights: at most 16x coarser (4 of the 8 bits). The bundled f64's blocks
# grow 6-13x (its INT8 decoder 49.2 -> 41.6 dB vs fp32); random-init paper-size weights (|w| < 0.008) would grow
# ~130x, their learned part rounded to almost nothing, so they keep the separate shortcut.
FOLD_MAX_STEP_GROWTH = 16.0


def fold_step_growth(m: nn.Module) -> float:
    """Median over output channels of how much coarser INT8's per-channel weight step gets from the fold:
    (max|w| + added) / max|w| (an upper bound: the added value meets one weight of the channel)."""
    added = 1.0 if isinstance(m, UpBlock) else 1.0 / (m.conv.in_channels * 4 // m.out_channels)
    with torch.no_grad():
        peak = m.conv.weight.detach().abs().flatten(1).amax(dim=1).float()
    return float(((peak + added) / peak.clamp_min(1e-12)).median())


def folds_shortcut(m: nn.Module) -> bool:
    """A block whose shortcut the form shortcuts_in_weights adds to its learned convolution's weights."""
    if isinstance(m, UpBlock):
        fits = m.shortcut and not m.interpolate  # nearest-upsampled: the copy depends on the sub-pixel
    elif isinstance(m, DownBlock):
        fits = m.shortcut and (strides_cheaply(m) or not m.pixel_unshuffle)
    else:
        return False
    return fits and fold_step_growth(m) <= FOLD_MAX_STEP_GROWTH


def shortcut_convolution(m: nn.Module) -> tuple[str, Callable] | None:
    if isinstance(m, UpBlock) and m.shortcut or isinstance(m, Decoder) and m.in_shortcut:
        return "duplicate_channels", duplicate_by_convolution
    if isinstance(m, DownBlock) and m.shortcut:
        return "space_to_channel_average", average_by_convolution
    if isinstance(m, Encoder) and m.out_shortcut:
        return "channel_average", functools.partial(average_by_convolution, factor=1)
    return None


# form name -> for a submodule: None if the form does not touch it, else (method replaced, replacement); the
# method may be a child's ("norm_out.forward")
FORMS: dict[str, Callable[[nn.Module], tuple[str, Callable] | None]] = {
    "pointwise_projections": lambda m: ("project", pointwise) if isinstance(m, LiteMLA) else None,
    "glu_halves": lambda m: ("value_and_gate", functools.partial(glu_halves, m)) if isinstance(m, GLUMBConv) else None,
    "glu_slices": lambda m: ("value_and_gate", functools.partial(glu_slices, m)) if isinstance(m, GLUMBConv) else None,
    "shortcut_convolutions": shortcut_convolution,
    "strided_downsample": lambda m: ("downsample", functools.partial(strided_downsample, m)) if strides_cheaply(m) else None,
    "channel_mean_by_convolution": lambda m: ("mean_square", functools.partial(
        mean_square_by_convolution, channel_mean_weight(m))) if isinstance(m, RMSNorm2d) else None,
    "softmax_attention": lambda m: ("attend", softmax_attention) if isinstance(m, Attention) else None,
    "qkv_slices": lambda m: ("forward", functools.partial(qkv_slices, m)) if isinstance(m, Attention) else None,
    "layer_norm_by_means": lambda m: ("forward", functools.partial(layer_norm_by_means, m))
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 else None,
    "fused_output_norm": lambda m: ("norm_out.forward", functools.partial(rms_norm_channels_last, m.norm_out))
    if isinstance(m, Decoder) and isinstance(m.norm_out, RMSNorm2d) else None,
    "shortcuts_in_weights": lambda m: ("forward", functools.partial(
        up_with_shortcut_in_weights if isinstance(m, UpBlock) else down_with_shortcut_in_weights, m)) if folds_shortcut(m) else None,
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
                if not swap:
                    continue
                child, _, method = swap[0].rpartition(".")
                target = sub.get_submodule(child)
                if method not in vars(target):
                    setattr(target, method, swap[1])  # an instance attribute shadows the class's method
                    patched.append((target, method))
        yield len(patched)
    finally:
        for sub, method in patched:
            delattr(sub, method)
