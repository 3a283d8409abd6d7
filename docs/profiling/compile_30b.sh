#!/usr/bin/env bash
# Issue #5's compile of a 60-layer LLaMA-30B-shape checkpoint in Meta's layout (params.json + 4 shards,
# random weights), on a device machine: wall time, peak host memory (the manifest's `resources`) and
# `hsc inspect --verify` for --target v100x4 (w8, TP=4) and --target h200x1 (fp8, fast accumulation).
#
# The 65 GB checkpoint is written to /dev/shm (memory: the one-GPU kind has 125 GiB of RAM but a 64 GiB
# disk); the artifacts go to disk. /dev/shm is not the compile's memory: the compile maps one shard
# slice at a time and its own peak is what `resources` reports.
#
#   PLAN=h200 (default; kind nvidia-h200): each artifact is verified, its manifest kept, then deleted
#             (two 30B artifacts do not fit the disk at once).
#   PLAN=x4   (kind nvidia-h200-x4, 235 GB disk): also a fp16 TP=4 artifact, the float reference, and both
#             run on the 4 GPUs over the first 500 items, compared with docs/profiling/compare_runs.py.
#
#   ARTIFACTS="v100x4-w8 h200x1-fp8" (default): which of the two compiles to run, e.g. ARTIFACTS=h200x1-fp8
#             alone when the other was measured already (docs/benchmarks.md).
#
# A device call lasts 10 minutes at most and the machine is released 30 s after a call ends, so:
#   bash docs/profiling/compile_30b.sh start      # launches every step detached, returns at once
#   bash docs/profiling/compile_30b.sh wait 560   # blocks until done or 560 s, then prints the log's tail
# and repeat `wait` in back-to-back calls until the log says DONE (or FAILED). Outputs (log, manifests,
# results) are copied to $OUT. For a dry run on a small machine: EXTRA="--layers 1" DEVICE=cpu
# COMPILE_EXTRA="--calib-items 8 --check-items 0 --alpha 0.85" CK=/tmp/ck LIMIT=8 RUN_EXTRA="--device cpu".
set -euo pipefail
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
H="python3 -m toolchain.cli"
PLAN=${PLAN:-h200}
CK=${CK:-/dev/shm/llama-30b}
A=${A:-/tmp/hsc-30b}
OUT=${OUT:-$A/out}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
COMPILE_EXTRA=${COMPILE_EXTRA:-}
LIMIT=${LIMIT:-500}  # items scored by the PLAN=x4 runs
ARTIFACTS=${ARTIFACTS:-v100x4-w8 h200x1-fp8}
RUN_EXTRA=${RUN_EXTRA:-}
LOG=$A/log.txt
mkdir -p "$A" "$OUT"

stamp() { date -u +"%F %T  $*"; }
wants() { case " $ARTIFACTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

compile_verify() {  # NAME TARGET PRECISION [TP [EXTRA OPTIONS]]
  local name=$1 target=$2 precision=$3 tp=${4:-} quant_options=""
  case "$precision" in fp8|int8|w8) quant_options="--device $DEVICE $COMPILE_EXTRA ${5:-}" ;; esac
  stamp "compile $name"
  # shellcheck disable=SC2086
  $H compile "$CK" --target "$target" --precision "$precision" ${tp:+--tp $tp} --force $quant_options -o "$A/$name"
  stamp "inspect --verify $name"
  $H inspect --verify "$A/$name"
  cp "$A/$name/manifest.json" "$OUT/$name-manifest.json"
}

steps() {
  set -E  # the ERR trap also fires inside functions
  trap 'stamp FAILED' ERR
  stamp "random checkpoint -> $CK"
  # shellcheck disable=SC2086
  $H random-checkpoint --shape llama-30b --shards 4 --no-checklist --force $EXTRA -o "$CK"
  du -sh "$CK"
  if wants v100x4-w8; then
    compile_verify llama30b-v100x4-w8 v100x4 w8 4
    if [ "$PLAN" = x4 ]; then
      compile_verify llama30b-v100x4-fp16 v100x4 fp16 4
      for name in llama30b-v100x4-fp16 llama30b-v100x4-w8; do
        stamp "run $name, 4 processes, $LIMIT items"
        # shellcheck disable=SC2086
        $H run "$A/$name" --nproc 4 --limit "$LIMIT" $RUN_EXTRA --output "$OUT/run-$name" | tail -3
      done
      python3 docs/profiling/compare_runs.py "$OUT/run-llama30b-v100x4-fp16/samples.jsonl" \
        "$OUT/run-llama30b-v100x4-w8/samples.jsonl"
      rm -rf "$A/llama30b-v100x4-fp16"
    fi
    rm -rf "$A/llama30b-v100x4-w8"
  fi
  if wants h200x1-fp8; then
    # with fast accumulation: the fp8 artifact that scores the set in <= 110 s (docs/quantization.md)
    compile_verify llama30b-h200x1-fp8 h200x1 fp8 "" --fast-accum
    rm -rf "$A/llama30b-h200x1-fp8"
  fi
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
for m in sorted(pathlib.Path(sys.argv[1]).glob("*-manifest.json")):
    r = json.loads(m.read_text()).get("resources", {})
    print(m.name.removesuffix("-manifest.json"), json.dumps(r))
PY
  stamp DONE
}

# shellcheck source=docs/profiling/detached.sh
source "$(dirname "$0")/detached.sh"
detached "$0" "$LOG" "$OUT" "$@"
