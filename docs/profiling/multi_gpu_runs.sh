#!/usr/bin/env bash
# The runs issues #3, #4 and #5 still need on four H200s (device kind nvidia-h200-x4), one part per call
# (each part fits the 10-minute limit of a device call). From the repository root, with shared/ carried:
#
#   bash docs/profiling/multi_gpu_runs.sh tp      # NCCL test; 2-layer 30B shape: TP=4 and DP=4 vs TP=1, 500 items
#                                                 # (N=2 bash ... tp: TP=2 and DP=2 on kind nvidia-h200-x2)
#   bash docs/profiling/multi_gpu_runs.sh dp      # hsc bench, 30B shape, full set, 4 GPUs data parallel: bf16, fp8 (fast accum.)
#   bash docs/profiling/multi_gpu_runs.sh tp4     # hsc bench, 30B shape, full set, the v100x4 plan (TP=4, fp16)
#   bash docs/profiling/multi_gpu_runs.sh smol    # SmolLM2 full set, 1 GPU vs 4 (data parallel), fp32 and bf16:
#                                                 # batch invariance across GPU counts (needs artifacts/smol.gguf)
#
# Outputs go to $OUT (the device tool's folder) or /tmp/hsc-x4/out; the last lines printed are the summary.
set -euo pipefail
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
H="python3 -m toolchain.cli"
N=${N:-4}
W=${W:-/tmp/hsc-x4}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
stamp() { date -u +"%T  $*" >&2; }
case "${1:-}" in
  tp)
    # N=2 (kind nvidia-h200-x2) does the same with TP=2 and DP=2 on h200x2 plans.
    stamp "NCCL tests"
    timeout 300 python3 -m pytest -q -m gpu tests/test_tensor_parallel.py 2>&1 | tail -2 || true
    stamp "random-checkpoint"
    $H random-checkpoint --shape llama-30b --layers 2 --shards 4 --no-checklist --force -o "$W/ckpt2"
    # fp16 everywhere, so that only the parallel layout differs between the three runs. 2 layers fit one
    # GPU: --tp forces the tensor-parallel plan (for N=4, the v100x4 one).
    stamp "compile tp1, tp$N, dp$N"
    $H compile "$W/ckpt2" --target h200x1 --precision fp16 --force -o "$W/tp1"
    if [ "$N" = 4 ]; then tp_target=v100x4; else tp_target=h200x$N; fi
    $H compile "$W/ckpt2" --target $tp_target --precision fp16 --tp "$N" --force -o "$W/tp$N"
    $H compile "$W/ckpt2" --target "h200x$N" --precision fp16 --tp 1 --force -o "$W/dp$N"
    stamp "run tp$N"
    $H run "$W/tp$N" --nproc "$N" --limit 500 --output "$OUT/tp$N" | tail -2
    stamp "run dp$N"
    $H run "$W/dp$N" --nproc "$N" --limit 500 --output "$OUT/dp$N" | tail -2
    stamp "run tp1"
    $H run "$W/tp1" --limit 500 --output "$OUT/tp1" | tail -2
    python3 docs/profiling/compare_runs.py "$OUT/tp1/samples.jsonl" "$OUT/tp$N/samples.jsonl" "$OUT/dp$N/samples.jsonl"
    ;;
  dp)
    # fp8 with fast accumulation: the configuration of the one-GPU fp8 measurement (issue #5: <= 30 s on 4)
    $H bench --shape llama-30b --gpus 4 --precision bf16 --output "$OUT/dp4-bf16" | tail -1
    $H bench --shape llama-30b --gpus 4 --precision fp8 --fast-accum --output "$OUT/dp4-fp8" | tail -1
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
