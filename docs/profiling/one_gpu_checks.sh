#!/usr/bin/env bash
# What is owed on one H200 (device kind nvidia-h200) since the flat layout became the CUDA default
# (docs/benchmarks.md, 2026-11-29, fifth session), one part per device call. From the repository root,
# with shared/ carried:
#
#   bash docs/profiling/one_gpu_checks.sh smol    # SmolLM2 (artifacts/smol.gguf), full set: the default engine
#                                                 # (flat) in fp32 and bf16 against the fp32 reference loop,
#                                                 # and each at --batch-tokens 8192 against 16384 (the default)
#   bash docs/profiling/one_gpu_checks.sh bf16    # hsc bench, 30B shape, bf16, full set, with the HF baseline
#   bash docs/profiling/one_gpu_checks.sh tests   # the GPU tests of the packed engine (both layouts, head sizes)
#   bash docs/profiling/one_gpu_checks.sh fp8     # hsc bench, 30B shape, fp8 with fast accumulation, full set
#
# Runs go to $W; results.json files and the summaries to $OUT (the device tool's folder) or $W/out.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
H="python3 -m toolchain.cli"
W=${W:-/tmp/hsc-1gpu}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
case "${1:-}" in
  smol)
    for p in fp32 bf16; do
      $H compile artifacts/smol.gguf --target h200x1 --precision $p --force -o "$W/s-$p" | tail -1
      for bt in 16384 8192; do
        $H run "$W/s-$p" --batch-tokens $bt --output "$W/flat-$p-$bt" | tail -4 | head -3
        cp "$W/flat-$p-$bt/results.json" "$OUT/flat-$p-$bt-results.json"
      done
    done
    $H run "$W/s-fp32" --engine reference --output "$W/ref-fp32" | tail -4 | head -3
    { python3 docs/profiling/compare_runs.py "$W/ref-fp32/samples.jsonl" "$W/flat-fp32-16384/samples.jsonl" \
        "$W/flat-bf16-16384/samples.jsonl"
      for p in fp32 bf16; do
        python3 docs/profiling/compare_runs.py "$W/flat-$p-16384/samples.jsonl" "$W/flat-$p-8192/samples.jsonl"
      done; } | tee "$OUT/compare.txt"
    ;;
  bf16)
    $H bench --shape llama-30b --precision bf16 --baseline hf --baseline-items 1000 --output "$OUT/bf16" 2>&1 | tail -1
    ;;
  tests)
    timeout 400 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -3
    ;;
  fp8)
    $H bench --shape llama-30b --precision fp8 --fast-accum --output "$OUT/fp8" 2>&1 | tail -1
    ;;
  *)
    echo "usage: bash docs/profiling/one_gpu_checks.sh smol|bf16|tests|fp8" >&2
    exit 2
    ;;
esac
