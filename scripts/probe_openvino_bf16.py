"""Probe (not a test): can single ops of an OpenVINO decoder stay f32 while the CPU runs the rest in
bf16 (what optimum's IR was thought to get from diffusers' fp32 upcasts)? Marks ops of the given
types through rt_info and reports bf16 PSNR against the f32 result on real photos, and latency.

    python scripts/probe_openvino_bf16.py --bundle exports/f64 MatMul Divide ReduceMean,Sqrt,Power
    python scripts/probe_openvino_bf16.py --bundle exports/f64 --key disable_fp16_compression_0 ALL

Result on OpenVINO 2026.4.1, AMD EPYC (avx512_bf16, VNNI, no AMX): docs/export.md, "OpenVINO bf16".
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="exports/f64")
    ap.add_argument("--photos", default="data/photos/eval/scikit-image")
    ap.add_argument("--key", default="precise_0", help="rt_info key that asks the CPU plugin to keep a node's precision")
    ap.add_argument("op_types", nargs="*", help="comma-separated op types per variant; ALL marks every node")
    args = ap.parse_args()
    import openvino as ov
    from PIL import Image

    files = sorted(p for p in Path(args.photos).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:10]
    if not files:
        raise SystemExit(f"{args.photos}: no photos")
    x = np.concatenate([(np.asarray(Image.open(p).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC), np.float32)
                         / 127.5 - 1).transpose(2, 0, 1)[None] for p in files])
    core = ov.Core()
    cfg = lambda hint: {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 2}  # noqa: E731
    enc = core.compile_model(f"{args.bundle}/vae_encoder/openvino_model.xml", "CPU", cfg("f32"))
    z = np.concatenate([enc(x[i:i + 1])[0] for i in range(len(x))])
    xml = f"{args.bundle}/vae_decoder/openvino_model.xml"

    def run(model, hint):
        c = core.compile_model(model, "CPU", cfg(hint))
        out = np.concatenate([c(z[i:i + 1])[0] for i in range(len(z))])
        times = []
        for _ in range(5):
            t = time.perf_counter()
            c(z[:1])
            times.append(time.perf_counter() - t)
        return out, 1000 * float(np.median(times))

    ref, ms32 = run(core.read_model(xml), "f32")
    print(f"{len(files)} photos, f32 {ms32:.0f} ms")
    for variant in ["(none)"] + args.op_types:
        model = core.read_model(xml)
        types = set(variant.split(","))
        marked = 0
        for op in model.get_ordered_ops():
            if variant == "ALL" or op.get_type_name() in types:
                op.get_rt_info()[args.key] = ""
                marked += 1
        try:
            out, ms = run(model, "bf16")
        except RuntimeError as e:
            print(f"  f32 {variant:38s} ({marked:3d} nodes): fails to compile: {str(e).splitlines()[-1][:120]}")
            continue
        p = 10 * np.log10(4 / np.maximum(((out - ref) ** 2).reshape(len(out), -1).mean(1), 1e-12))
        print(f"  f32 {variant:38s} ({marked:3d} nodes): bf16 PSNR vs f32 min {p.min():.1f} mean {p.mean():.1f} dB, {ms:.0f} ms")


if __name__ == "__main__":
    main()
