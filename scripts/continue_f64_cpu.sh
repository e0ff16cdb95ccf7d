#!/usr/bin/env bash
# Continue the bundled f64 edge model on CPU after the GPU lease (resumable: rerun to resume).
# Phase 1 continues from the GPU run's phase-1 EMA weights with a cosine-annealed learning rate;
# phases 2 and 3 follow as usual.
set -euo pipefail
OUT=${OUT:-runs/cpu-f64}
INIT=${INIT:-runs/gpu/f64-phase1.safetensors}
A="--model dc-ae-edge-f64c128 --out $OUT --device cpu --amp bf16 --ckpt-every 25 --log-every 5"
python -m dcae_edge.train $A --phase 1 --init "$INIT" --steps ${P1_STEPS:-1200} --lr 4e-4 --warmup 20 --lr-schedule cosine --batch-size 8
python -m dcae_edge.train $A --phase 2 --steps ${P2_STEPS:-120} --lr 1e-4 --warmup 10 --lr-schedule cosine --batch-size 4
python -m dcae_edge.train $A --phase 3 --steps ${P3_STEPS:-200} --lr 5.4e-5 --warmup 10 --lr-schedule cosine --batch-size 8
