#!/usr/bin/env bash
# Issue 12, item 6 on a GPU: the hard toy's two bases (SD-1.5 and SDXL families) trained on the card,
# then each base's difficulty table (teacher DDIM / DPM-Solver++ at 50 and 4 steps), in one run.
#
#   bash bench/gpu_hard_toy.sh                     # on the card (DEVICE=cuda); ~6 min on an H200 (estimate)
#   DEVICE=cpu SMOKE=1 bash bench/gpu_hard_toy.sh  # the same sequence, tiny, on a CPU: checks the script
#
# Writes $OUT/hard/{base,sdxl}/ (diffusers folders with training.json: steps, wall time, device),
# $OUT/hard/difficulty_{sd15,sdxl}.json and the logs. Copy the bases to data/toy/hard/{base,sdxl}
# to commit them (docs/toy-hard.md). Same recipe as the CPU runs of docs/toy-hard.md "Status".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/.gpu_out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
W="$OUT/hard"
mkdir -p "$W"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${SMOKE:-0}" = 1 ]; then
  SIZE=(--set train_scenes=64 --set vae_steps=2 --set vae_batch_size=4 --set train_steps=3 --set batch_size=4
        --set warmup_steps=1 --set eval_every=2 --set text_pretrain_steps=2 --set final_samples=8)
else
  SIZE=(--set train_scenes=8000 --set vae_steps=600 --set vae_batch_size=16 --set train_steps=6000
        --set batch_size=64 --set warmup_steps=100 --set eval_every=500 --set final_samples=200)
fi
SETS=(--set device="$DEVICE" --set style_fraction=0.25 --set checkpoint_dir="$W/ckpt" --set base_dir="$W/base"
      --set sdxl_dir="$W/sdxl" "${SIZE[@]}")
START=$(date +%s)
$PY -m components.toy.hard base "${SETS[@]}" --every 500 > "$W/base.log" 2>&1
$PY -m components.toy.hard sdxl "${SETS[@]}" --every 500 > "$W/sdxl.log" 2>&1
$PY -m components.toy.hard evaluate "${SETS[@]}" --report "$W/difficulty_sd15.json" > "$W/evaluate_sd15.log" 2>&1
$PY -m components.toy.hard evaluate --sdxl "${SETS[@]}" --report "$W/difficulty_sdxl.json" > "$W/evaluate_sdxl.log" 2>&1
echo "hard toy on $DEVICE: $(( $(date +%s) - START )) s; bases in $W/base, $W/sdxl; difficulty in $W/difficulty_*.json"
