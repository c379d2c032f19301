#!/usr/bin/env bash
# Rebuild dalle2_portable's default model from nothing, on CPU, with `dalle2 train` alone:
#   bash scripts/train_default_model.sh [RUNS_DIR]        (default runs/default; BACKEND=torch|mlx)
# Four stages, each a resumable run under RUNS_DIR (kill it any time; run the script again to continue):
#   clip      both CLIP towers from scratch, its tokenizer learnt from the shapes captions (32 px images)
#   prior     caption -> CLIP image embedding, x0 prediction (Karlo's objective)
#   decoder   CLIP image embedding (+ caption) -> 32 px image, v prediction, Karlo's learned variance
#   sr        32 -> 64 px upsampler, epsilon prediction, noise-augmented conditioning (min-SNR-5 weights
#             for the decoder and the upsampler)
# The seconds each stage took are appended to RUNS_DIR/times.txt.
set -euo pipefail
OUT=${1:-runs/default}
BACKEND=${BACKEND:-torch}
DATA=(--data shapes --data-size 5000 --seed 0)
mkdir -p "$OUT"

stage() {  # stage NAME ARGS...: train OUT/NAME unless its model exists; resume from its checkpoint if any
  local name=$1 run="$OUT/$1"; shift
  if [ -f "$run/model/model.json" ] && [ ! -f "$run/checkpoint/state.json" -o "$run/model" -nt "$run/checkpoint/state.json" ]; then
    echo "$name: done ($run/model)"; return
  fi
  local resume=()
  if [ -f "$run/checkpoint/state.json" ]; then resume=(--resume)
  elif [ -e "$run" ]; then rm -rf "$run"; fi  # started but never checkpointed: nothing to keep
  local start=$SECONDS
  dalle2 train "$@" "${DATA[@]}" --out "$run" --backend "$BACKEND" "${resume[@]}"
  echo "$name $((SECONDS - start)) s${resume:+ (resumed)}" >> "$OUT/times.txt"
}

stage clip clip --config tiny --image-size 32 --steps 5000 --batch-size 64 --lr 1e-3 --warmup 100 \
  --checkpoint-every 500
stage prior prior -m "$OUT/clip/model" --config tiny --steps 3000 --batch-size 64 --lr 1e-3 --warmup 100 \
  --checkpoint-every 500
stage decoder decoder -m "$OUT/prior/model" --config tiny --image-size 32 --prediction v_prediction \
  --min-snr-gamma 5 --steps 3000 --batch-size 32 --lr 1e-3 --warmup 200 --checkpoint-every 250
stage sr super-res -m "$OUT/decoder/model" --config tiny --image-size 64 --sr-noise 0.05 \
  --min-snr-gamma 5 --steps 1500 --batch-size 16 --lr 1e-3 --warmup 100 --checkpoint-every 250
echo "the model: $OUT/sr/model"
