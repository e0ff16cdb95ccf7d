#!/usr/bin/env bash
# The bundled digit generator (issue 17, part 1): a class-conditional DiT (flow matching) on the
# bundled f64's latents of data/digits/train (python -m dcae_edge.digits --out data/digits), whole
# 512² images (no crops: a crop could cut the digit; no flips: a mirrored 2 is not a 2). The latent
# cache is built on the first run (the encoder's latents x its scaling factor). Resumable: rerun.
# Then: python scripts/bundle_digits.py --run runs/digits-f64 (fp16 into dcae_edge/weights/).
set -euo pipefail
OUT=${OUT:-runs/digits-f64}
AE=${AE:-f64}
DATA=${DATA:-data/digits/train}
python -m dcae_edge.train_denoiser --autoencoder "$AE" --data "$DATA" --out "$OUT" --resolution 512 \
  --crops-per-image 1 --crop-min-scale 1.0 --no-flip --model ${MODEL:-dit-tiny} --hidden-size ${HIDDEN:-192} --depth ${DEPTH:-6} \
  --batch-size ${BATCH:-64} --steps ${STEPS:-4000} --lr ${LR:-3e-4} --warmup 200 --amp bf16 --device cpu \
  --ckpt-every 250 --log-every 20 --recipe-steps ${RECIPE_STEPS:-20} --recipe-cfg ${RECIPE_CFG:-3.0} --recipe-solver heun \
  --time-sampling ${TIME_SAMPLING:-logit-normal} --time-shift ${TIME_SHIFT:-1.0} ${INIT:+--init-from "$INIT"} ${FLOW_SKIP:+--flow-skip} ${LABEL_EVERY_TOKEN:+--label-every-token} ${CLASS_PRIOR:+--class-prior} ${CLASS_MEANS_FROM_DATA:+--class-means-from-data}
