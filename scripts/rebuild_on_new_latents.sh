#!/usr/bin/env bash
# After a whole-model autoencoder run (scripts/train_ae_full_cpu.sh, issue 17 part 2): install it,
# then rebuild what depends on the latent space, in order. Each step refuses rather than installing
# something worse (bundle_decoder_update.py: must beat the bundled weights at 256² and 512²;
# bundle_digits.py: the generator must match the installed autoencoder's latent fingerprint).
#   1. the autoencoder (fp16, BatchNorm re-estimated, its margin on the packaged photos recorded)
#   2. the digit generator, warm-started from the bundled one (run 9) on the new latents: its class
#      means re-estimated from the data (--class-means-from-data), then judged and bundled
#   3. the bundle and every report (scripts/bundle_reports.sh; SKIP_BENCH=1 leaves the slow benchmarks)
# Resumable step by step: the generator run resumes from its checkpoint.
set -euo pipefail
RUN=${RUN:-runs/cpu-f64-full-mse}
GEN=${GEN:-runs/digits-newlat}
GEN_STEPS=${GEN_STEPS:-1000}
CFG=${CFG:-2}

if [ -z "${SKIP_INSTALL:-}" ]; then
  python scripts/bundle_decoder_update.py --variant f64 --run "$RUN/phase1" "$RUN-512/phase1" --note cpu_full_mse \
    --allow-new-latents --report docs/training/bundled-f64-update
fi
OUT=$GEN DATA=data/digits-clean/train MODEL=uvit-tiny STEPS=$GEN_STEPS TIME_SAMPLING=uniform FLOW_SKIP=1 CLASS_PRIOR=1 \
  CLASS_MEANS_FROM_DATA=1 INIT=runs/digits-clean-prior/ckpt.pt bash scripts/train_digits_cpu.sh
python -m dcae_edge.evaluate --generator "$GEN/model.safetensors" --per-class 8 --steps 20 --cfg "$CFG" --out "$GEN/judged"
python scripts/bundle_digits.py --run "$GEN" --steps 20 --cfg "$CFG"
bash scripts/bundle_reports.sh
