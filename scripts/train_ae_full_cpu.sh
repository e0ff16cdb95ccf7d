#!/usr/bin/env bash
# A bundled autoencoder, whole-model MSE continuation on CPU (issue 17, part 2): the encoder trains
# too, so the latent space moves and whatever depends on it (the digits denoiser, INT8 artifacts,
# parity references) is rebuilt afterwards. Why the encoder: a linear block code (PCA of 64x64
# patches, 128 numbers per cell, i.e. the f64 latent's budget) reaches 22.79 dB on the held-out
# photos at 256² vs 21.59 for the thumbnail and 21.72 for the decoder-only f64, so the latent, not
# only the decoder, leaves ~1 dB on the table. 444 training photos from 20 collections, sampled by
# 1/sqrt(collection size) (--balance). Resumable: rerun the same command. Stage 2 adapts to 512².
#   bash scripts/train_ae_full_cpu.sh                                   # f64: 5,000 + 800 steps (bundled 12-02)
#   VARIANT=f32 STEPS=6000 bash scripts/train_ae_full_cpu.sh   # f32: 6,000 + 800 steps (12-02)
set -euo pipefail
VARIANT=${VARIANT:-f64}
case $VARIANT in
  f64) MODEL=dc-ae-edge-f64c128 ;;
  f32) MODEL=dc-ae-edge-f32c32 ;;
  *) echo "VARIANT must be f64 or f32, not '$VARIANT'" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/cpu-$VARIANT-full-mse}
INIT=${INIT:-dcae_edge/weights/$MODEL.safetensors}
A="--model $MODEL --device cpu --amp bf16 --ckpt-every 100 --log-every 10 --pixel-loss mse
   --perceptual none --gan-weight 0 --balance --data data/photos/train --eval-data data/photos/eval --lr-schedule cosine"
nice -n 10 python -m dcae_edge.train $A --phase 1 --out "$OUT" --init "$INIT" --steps ${STEPS:-5000} --lr 2e-4 \
  --warmup 50 --batch-size 8
nice -n 10 python -m dcae_edge.train $A --phase 1 --out "$OUT-512" --init "$OUT/phase1/model.safetensors" \
  --resolution 512 --steps ${STEPS_512:-800} --lr 5e-5 --warmup 20 --batch-size 2
