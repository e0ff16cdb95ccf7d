"""Parameters, MACs and torch CPU encode/decode time of every DC-AE preset.

    python scripts/model_card.py --out docs/model_card.md            # edge presets at 256, paper f64c128 at 512

MACs count conv / linear weights x output positions plus the attention matmuls (norms and
activations ignored), measured with forward hooks on a real forward pass.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from dcae_edge import autoencoder as A  # noqa: E402
from dcae_edge.autoencoder import DCAE, count_parameters  # noqa: E402
from dcae_edge.presets import EDGE, PUBLISHED, get_config  # noqa: E402
from dcae_edge.timing import time_calls  # noqa: E402


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    macs = [0]
    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, i, o: macs.__setitem__(
                0, macs[0] + o.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, i, o: macs.__setitem__(0, macs[0] + o.numel() * mod.in_features)))
    orig_lin, orig_quad = A.linear_attention, A.quadratic_attention

    def lin(q, k, v):  # (d+1) x N x d for v.k^T, then (d+1) x d x N for (.)q, per head
        b, h, d, n = q.shape
        macs[0] += b * h * 2 * (d + 1) * d * n
        return orig_lin(q, k, v)

    def quad(q, k, v):
        b, h, d, n = q.shape
        macs[0] += b * h * 2 * n * n * d
        return orig_quad(q, k, v)

    A.linear_attention, A.quadratic_attention = lin, quad
    try:
        with torch.no_grad():
            module(x)
    finally:
        A.linear_attention, A.quadratic_attention = orig_lin, orig_quad
        for h in hooks:
            h.remove()
    return macs[0]


def time_ms(fn, x, runs: int) -> float:
    with torch.no_grad():
        return statistics.median(time_calls(lambda: fn(x), runs))


def card(name: str, res: int, runs: int, timing: bool) -> dict:
    cfg = get_config(name)
    torch.manual_seed(0)
    model = DCAE(cfg).eval()
    f = cfg.spatial_compression
    x = torch.rand(1, 3, res, res) * 2 - 1
    z = torch.randn(1, cfg.latent_channels, res // f, res // f)
    row = {"name": name, "params": count_parameters(model), "encoder_params": count_parameters(model.encoder),
           "decoder_params": count_parameters(model.decoder), "resolution": res,
           "latent": [cfg.latent_channels, res // f, res // f],
           "encoder_gmacs": round(count_macs(model.encoder, x) / 1e9, 2), "decoder_gmacs": round(count_macs(model.decoder, z) / 1e9, 2)}
    if timing:
        row["encode_ms"] = round(time_ms(model.encoder, x, runs), 1)
        row["decode_ms"] = round(time_ms(model.decoder, z, runs), 1)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/model_card.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--paper-timing", default="dc-ae-f64c128-in-1.0", help="published model timed at 512 ('' = none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [card(n, 256, args.runs, True) for n in EDGE]
    for n in PUBLISHED:
        if n.endswith("mix-1.0") or n.endswith("sana-1.1"):
            continue  # same architecture as its in / 1.0 twin
        rows.append(card(n, 512, max(1, args.runs // 3), n == args.paper_timing))
    lines = [f"DC-AE presets: parameters, MACs and torch {torch.__version__} CPU latency ({args.threads} threads, batch 1, "
             f"fp32, median of {args.runs}; random weights). Command: `python scripts/model_card.py`", "",
             "| preset | params | encoder / decoder params | input | latent | encoder GMACs | decoder GMACs | encode ms | decode ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['encoder_params']:,} / {r['decoder_params']:,} | {r['resolution']}² | "
                     f"{'x'.join(map(str, r['latent']))} | {r['encoder_gmacs']} | {r['decoder_gmacs']} | "
                     f"{r.get('encode_ms', '')} | {r.get('decode_ms', '')} |")
    md = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(md)


if __name__ == "__main__":
    main()
