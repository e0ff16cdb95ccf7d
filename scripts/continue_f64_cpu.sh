#!/usr/bin/env bash
# Continue the bundled f64 edge model on CPU after the GPU lease: decoder-only training (a phase-3
# run whose head spans every decoder stage, so the whole decoder trains). The encoder, hence the
# latent space, the scaling factor and the bundled denoiser stay valid. MSE without GAN or
# perceptual term: this run is about held-out PSNR. Resumable: rerun the same command.
set -euo pipefail
OUT=${OUT:-runs/cpu-f64-decoder-mse}
INIT=${INIT:-dcae_edge/weights/dc-ae-edge-f64c128.safetensors}
python -m dcae_edge.train --model dc-ae-edge-f64c128 --out "$OUT" --device cpu --amp bf16 --ckpt-every 50 --log-every 10 \
  --phase 3 --init "$INIT" --head-stages 6 --gan-weight 0 --perceptual none --pixel-loss mse \
  --steps ${STEPS:-3000} --lr ${LR:-2e-4} --warmup 20 --lr-schedule cosine --batch-size 8
