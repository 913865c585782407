#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, in one run (about 6 minutes on one H100/H200):
#   tools/gpu_bench.sh [OUT_DIR]        (default out/gpu; every result is also written there as JSON or a log)
# Needs a CUDA build of torch with timm and open_clip installed; evamim is taken from this checkout (src/).
# Each measurement has its own time limit, so one failure does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-out/gpu}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TEACHER=open_clip:ViT-L-14-quickgelu/random   # CLIP-L/14's architecture; timing needs no weights

BUDGET=${GPU_BENCH_SECONDS:-600}               # skip what would not finish inside this many seconds in all

run() {  # run NAME SECONDS COMMAND...: stdout to OUT_DIR/NAME.json, stderr to OUT_DIR/NAME.log
    local name=$1 seconds=$2
    shift 2
    if (( SECONDS + seconds > BUDGET )); then
        echo "== $name: skipped ($((BUDGET - SECONDS)) s left of GPU_BENCH_SECONDS=$BUDGET, it may need $seconds)"
        return
    fi
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.log"
    echo "== $name: exit $? after $((SECONDS - start)) s"
    tail -n 3 "$OUT_DIR/$name.log"
}

BENCH=(python3 -m evamim bench pretrain --device cuda --precision bf16 --teacher "$TEACHER" --json)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT_DIR/gpu.txt"

# The order is the order of importance: what matters most runs first.
# 1. evamim's step against the loop a user writes with timm + open_clip (same model, teacher, loss, AdamW).
run base_naive 100 "${BENCH[@]}" --model eva_base_p16 --batch-size 256 --compare naive
run giant_naive 200 "${BENCH[@]}" --model eva_giant_p14 --batch-size 64 --grad-checkpointing --compare naive
# 2. MAE-style (75 % random masks, encoder on the visible quarter) against EVA's clip_mim (block masks, ~40 %).
run base_objectives 100 "${BENCH[@]}" --model eva_base_p16 --batch-size 256 --objective clip_mae --compare objectives
# 3. The real command end to end on the GPU: uint8 batches, pinned memory, workers, bf16, clip_mae.
run pretrain_e2e 100 python3 -m evamim pretrain objective=clip_mae model.name=eva_base_p16 teacher.spec="$TEACHER" \
    data.source=synthetic data.synthetic_size=4096 data.num_workers=8 batch_size=128 loop.total_steps=30 \
    loop.epochs=null loop.log_every=10 loop.progress_bar=false optim.warmup_steps=5 loop.precision=bf16 \
    device=cuda output_dir="$OUT_DIR/pretrain_run"
cp "$OUT_DIR/pretrain_run/summary.json" "$OUT_DIR/pretrain_summary.json" 2>/dev/null
cp "$OUT_DIR/pretrain_run/metrics.jsonl" "$OUT_DIR/pretrain_metrics.jsonl" 2>/dev/null
rm -rf "$OUT_DIR/pretrain_run"
# 4. The CUDA-only tests.
run cuda_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_engine_loop.py -k cuda
# 5. EVA-L, MAE-style, and torch.compile of the blocks (both candidates): last, they take longest to start.
run large_objectives 120 "${BENCH[@]}" --model eva_large_p14 --batch-size 128 --objective clip_mae --compare objectives
run base_naive_compiled 200 "${BENCH[@]}" --model eva_base_p16 --batch-size 256 --compare naive --compile
