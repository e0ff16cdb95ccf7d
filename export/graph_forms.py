"""Equivalent forms of DC-AE ops for the backends whose compilers run them faster (the idea of
optimum's ModelPatcher): same weights, same graph I/O, the same values up to float rounding.

The model keeps the forms every backend lowers well. Two of them cost OpenVINO's CPU plugin layout
work it does not need:

* ``pointwise_projections``: LiteMLA's q/k/v and output projections are Linear layers on a
  channels-last view (two permutes around a MatMul, as in diffusers); as 1x1 convolutions on NCHW
  there are no Transposes and no reorders around them;
* ``glu_halves``: GLUMBConv's expansion is split into value and gate halves after the depthwise conv
  (a channel split); computing each half with its own slices of the conv weights gives the same sums
  per output channel (bit for bit in torch) without the VariadicSplit and its reorders.

On the bundled f64 at 512² (AMD EPYC, AVX-512 bf16/VNNI, no AMX, 2 threads, OpenVINO performance
counters) they cut the decoder from 39.4 to 32.2 ms in bf16 and 31.9 to 23.5 ms INT8 + bf16, the
encoder from 31.2 to 29.1 / 26.8 to 22.6 ms. ExecuTorch must not get them: XNNPACK delegates only
convolutions whose weights are parameters, and a conv on a slice of one ran outside it (the decoder
0.22 -> 7 s). So a backend asks for forms by name around its tracing (``with graph_forms(module, ...)``)
and records them in its manifest entry; the model itself is untouched afterwards.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dcae_edge.autoencoder import GLUMBConv, LiteMLA


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


# form name -> (module class, method replaced, replacement bound to the module instance)
FORMS = {
    "pointwise_projections": (LiteMLA, "project", lambda m: pointwise),
    "glu_halves": (GLUMBConv, "value_and_gate", lambda m: functools.partial(glu_halves, m)),
}


def forms_in(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The named forms that change something in ``module`` (what a manifest records: a denoiser without
    LiteMLA or GLUMBConv blocks was traced in the model's own forms)."""
    return [n for n in names if any(isinstance(sub, FORMS[n][0]) for sub in module.modules())]


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
            cls, method, replacement = FORMS[name]
            for sub in module.modules():
                if isinstance(sub, cls) and method not in vars(sub):
                    setattr(sub, method, replacement(sub))  # an instance attribute shadows the class's method
                    patched.append((sub, method))
        yield len(patched)
    finally:
        for sub, method in patched:
            delattr(sub, method)
