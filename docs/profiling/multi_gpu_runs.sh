#!/usr/bin/env bash
# The runs issues #3, #4 and #5 still need on four H200s (device kind nvidia-h200-x4), one part per call
# (each part fits the 10-minute limit of a device call). From the repository root, with shared/ carried:
#
#   bash docs/profiling/multi_gpu_runs.sh tp      # NCCL test; 2-layer 30B shape: TP=4 and DP=4 vs TP=1, 500 items
#   bash docs/profiling/multi_gpu_runs.sh dp      # hsc bench, 30B shape, full set, 4 GPUs data parallel: bf16, fp8
#   bash docs/profiling/multi_gpu_runs.sh tp4     # hsc bench, 30B shape, full set, the v100x4 plan (TP=4, fp16)
#   bash docs/profiling/multi_gpu_runs.sh smol    # SmolLM2 full set, 1 GPU vs 4 (data parallel), fp32 and bf16:
#                                                 # batch invariance across GPU counts (needs artifacts/smol.gguf)
#
# Outputs go to $OUT (the device tool's folder) or /tmp/hsc-x4/out; the last lines printed are the summary.
set -euo pipefail
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
H="python3 -m toolchain.cli"
W=${W:-/tmp/hsc-x4}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
case "${1:-}" in
  tp)
    python3 -m pytest -q -m gpu tests/test_tensor_parallel.py 2>&1 | tail -2
    $H random-checkpoint --shape llama-30b --layers 2 --shards 4 --no-checklist --force -o "$W/ckpt2"
    # fp16 everywhere, so that only the parallel layout differs between the three runs.
    $H compile "$W/ckpt2" --target h200x1 --precision fp16 --force -o "$W/tp1"
    $H compile "$W/ckpt2" --target v100x4 --precision fp16 --tp 4 --force -o "$W/tp4"   # 2 layers fit one GPU: force the 30B plan
    $H compile "$W/ckpt2" --target h200x4 --precision fp16 --force -o "$W/dp4"
    $H run "$W/tp1" --limit 500 --output "$OUT/tp1" | tail -2
    $H run "$W/tp4" --nproc 4 --limit 500 --output "$OUT/tp4" | tail -2
    $H run "$W/dp4" --nproc 4 --limit 500 --output "$OUT/dp4" | tail -2
    python3 docs/profiling/compare_runs.py "$OUT/tp1/samples.jsonl" "$OUT/tp4/samples.jsonl" "$OUT/dp4/samples.jsonl"
    ;;
  dp)
    for p in bf16 fp8; do
      $H bench --shape llama-30b --gpus 4 --precision $p --output "$OUT/dp4-$p" | tail -1
    done
    ;;
  tp4)
    $H bench --shape llama-30b --gpus 4 --tp 4 --precision fp16 --output "$OUT/tp4-fp16" | tail -1
    ;;
  smol)
    for p in fp32 bf16; do
      $H compile artifacts/smol.gguf --target h200x1 --precision $p --force -o "$W/s1-$p"
      $H compile artifacts/smol.gguf --target h200x4 --precision $p --force -o "$W/s4-$p"
      $H run "$W/s1-$p" --output "$OUT/s1-$p" | tail -2
      $H run "$W/s4-$p" --nproc 4 --output "$OUT/s4-$p" | tail -2
    done
    for p in fp32 bf16; do
      python3 docs/profiling/compare_runs.py "$OUT/s1-$p/samples.jsonl" "$OUT/s4-$p/samples.jsonl"
    done
    ;;
  *)
    echo "usage: bash docs/profiling/multi_gpu_runs.sh tp|dp|tp4|smol" >&2
    exit 2
    ;;
esac
