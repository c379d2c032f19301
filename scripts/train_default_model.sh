#!/usr/bin/env bash
# Rebuild dalle2_portable's default model from nothing, on CPU, with `dalle2 train` alone:
#   bash scripts/train_default_model.sh [RUNS_DIR]        (default runs/default; BACKEND=torch|mlx)
# Four stages, each a resumable run under RUNS_DIR (kill it any time; run the script again to continue):
#   clip      both CLIP towers from scratch, its tokenizer learnt from the shapes captions (32 px images); 50000
#             items, as the prior and the decoder (5000 overfit: a held-out shape probe of the image embeddings
#             read 82% right, 94% with 50000)
#   prior     caption -> CLIP image embedding, x0 prediction (Karlo's objective), 4 layers 128 wide, 20000 steps
#             (the 2-layer, 32-wide prior left some "a {color} {shape}" decoding to a plain picture of the
#             colour: 560/594 right on the grid at 3 seeds; this one 587/594)
#   decoder   CLIP image embedding (+ caption) -> 32 px image: a 3-level UNet (32/64/96 channels, attention at
#             8 x 8 only), v prediction, min-SNR-5 weights, Karlo's learned variance
#   sr        32 -> 64 px upsampler (16/32/64 channels), v prediction, min-SNR-5, noise-augmented conditioning;
#             5000 items are plenty; trained on random 32 px squares of the 64 px pictures (DALL-E 2's
#             quarter-area crops: a step costs a quarter), 6000 steps, so that its lane (then the prior) ends
#             before the other
# Two lanes, side by side, one CPU thread each: CLIP then the decoder, and the upsampler (it sees pixels only, so
# it trains from nothing beside CLIP) then the prior (which waits for CLIP); a lane left alone, e.g. on a resume
# after the other finished, gets every thread. scripts/package_default_model.py then joins the stages. The
# seconds each stage took go to RUNS_DIR/times.txt.
set -euo pipefail
OUT=${1:-runs/default}
BACKEND=${BACKEND:-torch}
DATA=(--data shapes --seed 0)
steps() { if [ "${SMOKE:-0}" = 1 ]; then echo 2; else echo "$1"; fi; }
items() { if [ "${SMOKE:-0}" = 1 ]; then echo 64; else echo "$1"; fi; }
ITEMS=(--data-size "$(items 50000)")
mkdir -p "$OUT"
BEGAN=$SECONDS
lines() { if [ -f "$OUT/times.txt" ]; then wc -l < "$OUT/times.txt"; else echo 0; fi; }
BEFORE=$(lines)  # a run that trains nothing adds no "all" line

finished() {  # finished NAME: OUT/NAME has its model, written after its last checkpoint
  local run="$OUT/$1"
  [ -f "$run/model/model.json" ] && [ ! -f "$run/checkpoint/state.json" -o "$run/model" -nt "$run/checkpoint/state.json" ]
}

stage() {  # stage NAME ARGS...: train OUT/NAME unless its model exists; resume from its checkpoint if any
  local name=$1 run="$OUT/$1"; shift
  if finished "$name"; then
    echo "$name: done ($run/model)"; return
  fi
  local resume=()
  if [ -f "$run/checkpoint/state.json" ]; then resume=(--resume)
  elif [ -e "$run" ]; then rm -rf "$run"; fi  # started but never checkpointed: nothing to keep
  local start=$SECONDS
  dalle2 train "$@" "${DATA[@]}" --out "$run" --backend "$BACKEND" "${resume[@]}"
  echo "$name $((SECONDS - start)) s${resume:+ (resumed)}${THREADS:+ ($THREADS thread, side by side)}" >> "$OUT/times.txt"
}

cat > "$OUT/prior.json" <<'JSON'
{"preset": "tiny", "prior": {"num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 4, "time_embed_dim": 128}}
JSON
cat > "$OUT/decoder.json" <<'JSON'
{"preset": "tiny", "decoder": {"block_out_channels": [32, 64, 96],
 "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
 "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"]}}
JSON
cat > "$OUT/sr.json" <<'JSON'
{"preset": "tiny", "super_res_first": {"block_out_channels": [16, 32, 64],
 "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"],
 "up_block_types": ["ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"]}}
JSON

left() { local n=0 name; for name in "$@"; do finished "$name" || n=$((n + 1)); done; echo $n; }
if [ "$(left clip decoder)" -gt 0 ] && [ "$(left sr prior)" -gt 0 ]; then export OMP_NUM_THREADS=1 THREADS=1; fi
failed=0
check() { wait "$1" || failed=1; }  # check PID: note a lane's stage that stopped (the other lane goes on)
stage clip clip "${ITEMS[@]}" --config tiny --image-size 32 --steps "$(steps 6000)" --batch-size 64 --lr 1e-3 \
  --warmup 100 --checkpoint-every 500 --quiet &
clip=$!
stage sr super-res --data-size "$(items 5000)" --config "$OUT/sr.json" --image-size 64 --low-size 32 --sr-noise 0.05 \
  --sr-crop 32 --prediction v_prediction --min-snr-gamma 5 --steps "$(steps 6000)" --batch-size 32 --lr 1e-3 \
  --warmup 100 --checkpoint-every 500 --quiet &
sr=$!
check $clip
decoder=
if [ $failed = 0 ]; then
  stage decoder decoder "${ITEMS[@]}" -m "$OUT/clip/model" --config "$OUT/decoder.json" --image-size 32 \
    --prediction v_prediction --min-snr-gamma 5 --steps "$(steps 5500)" --batch-size 32 --lr 1e-3 --warmup 200 \
    --checkpoint-every 250 --quiet &
  decoder=$!
fi
check $sr
if [ $failed = 0 ]; then
  stage prior prior "${ITEMS[@]}" -m "$OUT/clip/model" --config "$OUT/prior.json" --steps "$(steps 20000)" \
    --batch-size 64 --lr 1e-3 --warmup 100 --checkpoint-every 2000 --quiet &
  check $!
fi
[ -z "$decoder" ] || check $decoder
[ $failed = 0 ] || { echo "error: a stage stopped; run the script again to resume" >&2; exit 1; }
if [ "$(lines)" -gt "$BEFORE" ]; then
  echo "all $((SECONDS - BEGAN)) s (wall, this run of the script)" >> "$OUT/times.txt"
fi
echo "the stages: $OUT; join them and put the model in the package with scripts/package_default_model.py $OUT"
