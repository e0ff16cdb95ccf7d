#!/usr/bin/env bash
# Continue the bundled f64 edge model on CPU after the GPU lease (resumable: rerun to resume).
# Phase 1 continues from the GPU run's phase-1 EMA weights; phases 2 and 3 follow as usual.
set -euo pipefail
OUT=${OUT:-runs/cpu-f64}
INIT=${INIT:-runs/gpu/f64-phase1.safetensors}
A="--model dc-ae-edge-f64c128 --out $OUT --device cpu --amp bf16 --ckpt-every 50 --log-every 10"
python -m dcae_edge.train $A --phase 1 --init "$INIT" --steps ${P1_STEPS:-3000} --lr 3e-4 --warmup 50 --batch-size 8
python -m dcae_edge.train $A --phase 2 --steps ${P2_STEPS:-150} --lr 1e-4 --warmup 10 --batch-size 4
python -m dcae_edge.train $A --phase 3 --steps ${P3_STEPS:-300} --lr 5.4e-5 --warmup 10 --batch-size 8
