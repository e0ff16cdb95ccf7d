#!/usr/bin/env bash
# Train the bundled denoiser on CPU for the bundled f64 autoencoder (rerun to resume), then bundle it.
set -euo pipefail
OUT=${OUT:-runs/cpu-dit-f64}
python -m dcae_edge.train_denoiser --autoencoder f64 --data data/photos/train --out "$OUT" --resolution 512 \
  --crops-per-image ${CROPS:-16} --model dit-tiny --hidden-size 192 --depth 6 --batch-size 64 \
  --steps ${STEPS:-3000} --lr 3e-4 --warmup 100 --amp bf16 --device cpu --ckpt-every 250 --log-every 20
python - "$OUT" <<'PY'
import sys, torch
from dcae_edge.denoiser import load_denoiser, save_denoiser
model, meta = load_denoiser(f"{sys.argv[1]}/model.safetensors")
save_denoiser(model, "dcae_edge/weights/dit-f64.safetensors", dtype=torch.float16,
              extra={k: v for k, v in meta.items() if k not in ("format", "kind")})
print("bundled dcae_edge/weights/dit-f64.safetensors")
PY
