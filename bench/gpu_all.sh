#!/usr/bin/env bash
# Every GPU row of docs/benchmarks.md (issue 13) once, on one H100/H200-class card, in ~8 minutes.
#
#   bash bench/gpu_all.sh                 # figures -> $OUT/gpu_rows_<card>.txt (+ one JSON per row)
#
# Before, on a machine with network (the card's machine may have none), put what it lacks beside
# the repository (both folders are gitignored; carry them with the working tree):
#   pip download -d bench/.wheels diffusers==0.42.1 peft==0.21.2 accelerate webdataset braceexpand \
#       pydantic pydantic-core annotated-types typing-inspection importlib_metadata scikit-learn pyarrow
#   git -C "$LCMLORA_DIFFUSERS_GIT" show \   # a diffusers git directory
#       HEAD:examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py \
#       > bench/.reference/train_lcm_distill_lora_sd_wds.py
#   (or: git clone --depth 1 https://github.com/huggingface/diffusers; copy the same file)
# Each row has its own time limit; a failed row is written as FAILED and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/.gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. What the card lacks: installed from bench/.wheels when present, else from the index.
missing=$($PY - <<'EOF'
import importlib.util
mods = {"diffusers": "diffusers==0.42.1", "peft": "peft==0.21.2", "accelerate": "accelerate",
        "webdataset": "webdataset", "braceexpand": "braceexpand", "pydantic": "pydantic",
        "sklearn": "scikit-learn", "pyarrow": "pyarrow", "transformers": "transformers"}
print(" ".join(v for k, v in mods.items() if importlib.util.find_spec(k) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -d bench/.wheels ]; then $PY -m pip install -q --no-index --find-links bench/.wheels $missing
  else $PY -m pip install -q $missing; fi
fi

CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
SLUG=$(echo "$CARD" | tr ' /' '__')
REPORT="$OUT/gpu_rows_${SLUG}.txt"
{ echo "# issue 13 GPU rows | $CARD | $(date -u +%FT%TZ) | torch $($PY -c 'import torch; print(torch.__version__)')"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; } > "$REPORT"

row() {  # row NAME SECONDS CMD...: run, keep its last lines in the report
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$REPORT"
  local t0=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    grep -v -i "warn\|loading\|it/s" "$OUT/$name.log" | tail -12 >> "$REPORT"
  else
    echo "FAILED (rc $?, see $name.log)" >> "$REPORT"; tail -5 "$OUT/$name.log" >> "$REPORT"
  fi
  echo "   ($((SECONDS - t0)) s)" >> "$REPORT"
}

FAST="--opt optimizer=adamw_fused --opt sync_every=5 --opt prefetch=2"
S15="--arch data/arch/sd15 --random-weights --resolution 512 --bf16 --device cuda"
SXL="--arch data/arch/sdxl --random-weights --resolution 1024 --bf16 --device cuda"

# 2. LCD step MFU: plain loop breakdown (the table's rows), then the speed-ups, loop only.
row sd15_b8_plain 90 $PY bench/bench_distill_step.py $S15 --batch 8 --steps 6 --warmup 2 --json "$OUT/sd15_b8_plain.json"
row sd15_scan_fast 150 $PY bench/bench_distill_step.py $S15 $FAST --loop-only --steps 10 --warmup 5 --batch-scan 8,16,32
row sd15_b16_compile 150 $PY bench/bench_distill_step.py $S15 $FAST --opt compile_unet=true --loop-only --batch 16 \
    --steps 10 --warmup 5 --json "$OUT/sd15_b16_compile.json"
row sdxl_b4_fast 120 $PY bench/bench_distill_step.py $SXL $FAST --loop-only --batch 4 --steps 5 --warmup 5 \
    --json "$OUT/sdxl_b4_fast.json"
row sdxl_b4_fast_gc_8bit 90 $PY bench/bench_distill_step.py $SXL --opt optimizer=adamw_8bit --opt sync_every=5 \
    --opt prefetch=2 --gradient-checkpointing --loop-only --batch 8 --steps 5 --warmup 3 --json "$OUT/sdxl_b8_gc.json"

# 3. lcmlora distill beside the diffusers reference, SD-1.5 architecture, 512 px, batch 8, rank 64, bf16.
row reference_sd15 210 $PY bench/bench_reference.py --arch data/arch/sd15 --resolution 512 --batch 8 --rank 64 \
    --guidance 7.5 --device cuda --bf16 --warmup 3 --steps 5 --rounds 1 --work "$OUT/reference" \
    --variant plain= --variant fast=optimizer=adamw_fused,sync_every=4,prefetch=2 --json "$OUT/reference_sd15.json"

# 4. End-to-end inference: 4-step LCM vs 25-step DPM-Solver++ with CFG.
row infer_sd15 60 $PY bench/bench_inference.py --arch data/arch/sd15 --resolution 512 --batch 4 --repeat 2 \
    --device cuda --dtype bfloat16 --json "$OUT/infer_sd15.json"
row infer_sdxl 90 $PY bench/bench_inference.py --arch data/arch/sdxl --resolution 1024 --batch 2 --repeat 2 \
    --device cuda --dtype bfloat16 --json "$OUT/infer_sdxl.json"

echo "report: $REPORT"
cat "$REPORT"
