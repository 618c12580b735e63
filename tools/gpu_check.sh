#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU: every `gpu`-marked test, then the GPU benchmarks, with their
# JSON (and a log per step) in one folder. Sized for under 10 minutes on one modern GPU (H100/H200 class); it is what
# produces the README's CUDA rows.
#
# Usage: tools/gpu_check.sh [OUT_DIR]        (default docs/benchmarks/cuda; PYTHON=... picks the interpreter)
#
# Steps (each with its own time limit; a failed step is reported and the others still run):
#   1. pytest -m gpu                           fused attention, checkpointing, bf16 PEFT, predict on CUDA
#   2. tools/bench_backbones.py --device cuda  images/s and MFU (SAM ViT-B batch 8/32, LiteMedSAM batch 64),
#                                              fused vs reference attention, bf16
#   3. tools/bench_adapters.py --device cuda   peak training memory per PEFT method and memory-lean variant
#   4. tools/bench_predict.py --devices cuda   medseg predict vs the predict_array loop, fp32 and bf16
#   5. tools/bench_interactive.py --devices cuda   clicks with a cached embedding, encoder, propagation
#   6. tools/bench_train.py --device cuda      training throughput, when that tool exists (skipped with a note if not)
# Exit status: 0 when every step passed, 1 when one failed, 2 without a CUDA device.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-docs/benchmarks/cuda}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing was run." >&2
    exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee -a "$SUMMARY"

status=0
start_all=$SECONDS

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output in OUT/NAME.log and one summary line.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "gpu_check: $name ..." >&2
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "ok      $name ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    else
        local rc=$?
        [[ $rc -eq 124 ]] && local why="timed out after ${limit} s" || local why="exit $rc"
        echo "FAILED  $name ($why, $((SECONDS - start)) s): see $OUT/$name.log" | tee -a "$SUMMARY"
        status=1
    fi
}

step gpu_tests 120 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

step bench_backbones_sam 90 "$PY" tools/bench_backbones.py --names sam_vit_b --device cuda --dtypes bf16 \
    --attention fused reference --batch-sizes 8 32 --repeats 5 --warmup 2 --output "$OUT/backbones_sam.json"
step bench_backbones_litemedsam 45 "$PY" tools/bench_backbones.py --names litemedsam --device cuda --dtypes bf16 \
    --attention fused reference --batch-sizes 64 --repeats 5 --warmup 2 --output "$OUT/backbones_litemedsam.json"

step bench_adapters 150 "$PY" tools/bench_adapters.py --device cuda --backbones litemedsam sam_vit_b \
    --methods full frozen lora lora_late adaptformer adapter3d \
    --sam-methods full frozen lora lora_late lora_ckpt lora_bf16 lora_lean adaptformer adapter3d \
    --steps 2 --warmup 1 --timeout 120 --out "$OUT/adapters.json"

step bench_predict 75 "$PY" tools/bench_predict.py --devices cuda --precisions fp32 bf16 --clicks 50 \
    --output "$OUT/predict.json" --table
step bench_interactive 45 "$PY" tools/bench_interactive.py --devices cuda --clicks 200 \
    --output "$OUT/interactive.json" --table

if [[ -f tools/bench_train.py ]]; then
    step bench_train 75 "$PY" tools/bench_train.py --device cuda --steps 5 --warmup 2 --output "$OUT/train.json" --table
else
    echo "skipped bench_train: tools/bench_train.py does not exist yet (training throughput not measured)" \
        | tee -a "$SUMMARY"
fi

echo "gpu_check: $((SECONDS - start_all)) s in all; results and logs in $OUT (summary: $SUMMARY)" | tee -a "$SUMMARY"
exit $status
