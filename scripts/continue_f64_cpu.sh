#!/usr/bin/env bash
# Continue the bundled f64 edge model on CPU after the GPU lease: decoder-only training (phase-3
# runs whose head spans every decoder stage, so the whole decoder trains). The encoder, hence the
# latent space, the scaling factor and the bundled denoiser stay valid. MSE without GAN or
# perceptual term: these runs are about held-out PSNR. First at 256² (batch 8), then at 512²
# (batch 2, same pixels per step) for the high-resolution decode, as phase 2 does in the paper.
# Resumable: rerun the same command. Then install with scripts/bundle_decoder_update.py.
set -euo pipefail
OUT=${OUT:-runs/cpu-f64-decoder-mse}
INIT=${INIT:-dcae_edge/weights/dc-ae-edge-f64c128.safetensors}
A="--model dc-ae-edge-f64c128 --device cpu --amp bf16 --ckpt-every 50 --log-every 10 --phase 3 --head-stages 6
   --gan-weight 0 --perceptual none --pixel-loss mse --warmup 20 --lr-schedule cosine"
python -m dcae_edge.train $A --out "$OUT" --init "$INIT" --steps ${STEPS:-3000} --lr 2e-4 --batch-size 8
python -m dcae_edge.train $A --out "$OUT-512" --init "$OUT/phase3/model.safetensors" --resolution 512 \
  --steps ${STEPS_512:-800} --lr 1e-4 --batch-size 2
