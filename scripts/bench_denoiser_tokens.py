"""The structure of the paper's 19.1x / 17.9x claim: the same diffusion transformer on DC-AE f64
latents with patch 1 (512px -> 8x8x128, 64 tokens) versus SD-VAE f8 latents with patch 2
(512px -> 64x64x4, 1024 tokens). Times one denoiser step at batch 2 (CFG) and one training step.

    python scripts/bench_denoiser_tokens.py --preset uvit-h --device cuda          # paper size, GPU
    python scripts/bench_denoiser_tokens.py --preset dit-small --device cpu --onnx   # this CPU, + ORT

Writes JSON to --out (default docs/bench_denoiser_tokens-<device>.json) and prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcae_edge.timing import time_calls  # noqa: E402

PRESETS = {  # arch, hidden, depth, heads
    "uvit-h": ("uvit", 1152, 28, 16),
    "dit-xl": ("dit", 1152, 28, 16),
    "uvit-s": ("uvit", 512, 12, 8),
    "dit-small": ("dit", 384, 12, 6),
}
LATENTS = {  # name: (channels, latent size at 512px, patch)
    "dc-ae-f64p1": (128, 8, 1),
    "sd-vae-f8p2": (4, 64, 2),
}


def timeit(fn, device, warmup: int, iters: int) -> list[float]:
    import torch

    return time_calls(fn, iters, warmup, sync=torch.cuda.synchronize if device == "cuda" else None)


def main():
    import torch

    from dcae_edge.denoiser import DenoiserConfig, Denoiser

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="dit-small", choices=list(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="bf16 (default on cuda) | fp32 (default on cpu)")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", action="store_true", help="also time the inference step in onnxruntime (CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if dev == "cuda" else "fp32")]
    iters = args.iters or (50 if dev == "cuda" else 5)
    train_batch = args.train_batch or (64 if dev == "cuda" else 8)
    arch, hidden, depth, heads = PRESETS[args.preset]
    results = {"preset": args.preset, "arch": arch, "hidden": hidden, "depth": depth, "device": dev,
               "device_name": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
               "dtype": str(dtype).split(".")[-1], "threads": args.threads, "torch": torch.__version__, "latents": {}}
    for name, (c, s, p) in LATENTS.items():
        cfg = DenoiserConfig(arch=arch, input_size=s, in_channels=c, patch_size=p, hidden_size=hidden, depth=depth,
                             num_heads=heads, num_classes=1000, qkv_bias=arch == "dit", prediction="eps")
        model = Denoiser(cfg).to(dev)
        tokens = (s // p) ** 2
        x = torch.randn(2, c, s, s, device=dev)
        t = torch.tensor([500.0, 500.0], device=dev)
        y = torch.tensor([1, 1000], device=dev)
        model.eval()

        def infer():
            with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                model(x, t, y)

        inf = timeit(infer, dev, 3, iters)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        xb = torch.randn(train_batch, c, s, s, device=dev)
        tb = torch.rand(train_batch, device=dev) * 999
        yb = torch.randint(0, 1000, (train_batch,), device=dev)

        def train_step():
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                loss = (model(xb, tb, yb).float() - xb).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        tr = timeit(train_step, dev, 2, max(3, iters // 5))
        row = {"tokens": tokens, "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 2),
               "infer_ms_batch2_p50": round(statistics.median(inf), 3),
               "train_step_ms_p50": round(statistics.median(tr), 3), "train_batch": train_batch,
               "train_img_per_s": round(train_batch / (statistics.median(tr) / 1000), 1)}
        if args.onnx and dev == "cpu":
            import tempfile

            import onnxruntime as ort

            model.eval()
            with tempfile.TemporaryDirectory() as d:
                path = f"{d}/m.onnx"
                torch.onnx.export(model, (x, t, y), path, dynamo=True, opset_version=18, external_data=False)
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                feeds = {i.name: v for i, v in zip(sess.get_inputs(), (x.numpy(), t.numpy(), y.numpy()))}
                ort_ms = timeit(lambda: sess.run(None, feeds), "cpu", 2, iters)
            row["ort_infer_ms_batch2_p50"] = round(statistics.median(ort_ms), 3)
        results["latents"][name] = row
        print(name, json.dumps(row), flush=True)
        del model, opt
        if dev == "cuda":
            torch.cuda.empty_cache()
    a, b = results["latents"]["sd-vae-f8p2"], results["latents"]["dc-ae-f64p1"]
    results["ratios"] = {"inference_step": round(a["infer_ms_batch2_p50"] / b["infer_ms_batch2_p50"], 2),
                         "training_step": round(a["train_step_ms_p50"] / b["train_step_ms_p50"], 2)}
    if "ort_infer_ms_batch2_p50" in a:
        results["ratios"]["ort_inference_step"] = round(a["ort_infer_ms_batch2_p50"] / b["ort_infer_ms_batch2_p50"], 2)
    print("ratios (f8p2 / f64p1):", json.dumps(results["ratios"]))
    out = Path(args.out or ROOT / "docs" / f"bench_denoiser_tokens-{args.preset}-{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
