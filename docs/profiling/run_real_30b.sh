#!/usr/bin/env bash
# `hsc run` end to end on real 30B-shaped artifacts (issue #17): a 60-layer LLaMA-30B-shape checkpoint
# (random weights, Meta layout) compiled to h200x1 bf16 and fp8, then `hsc run` of each on the full
# validation set from a fresh process, twice: the first run hashes the rank file (and records it) and
# compiles (and keeps the compile cache); the second finds both. hsc run times each phase itself
# (results.json `timings`: verify, load, prepare, warm-up, scoring, writing, total); the summary at the
# end prints them with the process's own wall clock.
#
#   MODE=h200 (default; kind nvidia-h200): bf16 then fp8 on one GPU. The bf16 artifact (65 GB) is
#             deleted before the fp8 compile: the one-GPU kind's disk holds one 30B bf16 artifact.
#   MODE=x2   (kind nvidia-h200-x2): the same one-GPU runs, then DP=2 (bf16, fp8) and TP=2 (bf16) with
#             --nproc 2, each once (a first run: it compiles), and docs/profiling/compare_runs.py of each
#             against its one-GPU run (per-item agreement).
#   PRECISIONS="bf16 fp8" (default): which artifacts to build and run.
#   CK_LAYOUT=hf: the checkpoint in Hugging Face's layout (config.json + safetensors files), so the
#             compile's wall time and peak host memory are those of an HF ingest (issue #16).
#
# A device call lasts 10 minutes at most, so:
#   bash docs/profiling/run_real_30b.sh start      # launches every step detached, returns at once
#   bash docs/profiling/run_real_30b.sh wait 560   # blocks until done or 560 s, then prints the log's tail
# and repeat `wait` in back-to-back calls until the log says DONE (or FAILED). The log, results.json of
# every run and the summary are copied to $OUT. A dry run on a small machine (a few minutes on a CPU):
#   EXTRA="--layers 1" DEVICE=cpu LIMIT=8 FP8_EXTRA="--calib-items 8 --check-items 0 --alpha 0.85" CK=/tmp/ck A=/tmp/rr \
#     bash docs/profiling/run_real_30b.sh steps
set -euo pipefail
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
H="python3 -m toolchain.cli"
MODE=${MODE:-h200}
CK=${CK:-/dev/shm/llama-30b}
A=${A:-/tmp/hsc-run30b}
OUT=${OUT:-$A/out}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
LIMIT=${LIMIT:-}  # empty: the full set
PRECISIONS=${PRECISIONS:-bf16 fp8}
CK_LAYOUT=${CK_LAYOUT:-meta}
FP8_EXTRA=${FP8_EXTRA:---calib-items 64 --check-items 0 --fast-accum}
# the hsc cache (verification records, compile caches) of this measurement alone, so the first run is cold
export HSC_CACHE_DIR=${HSC_CACHE_DIR:-$A/hsc-cache}
LOG=$A/log.txt
mkdir -p "$A" "$OUT"

stamp() { date -u +"%F %T  $*"; }
wants() { case " $PRECISIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
run_opts() {  # options every hsc run gets
  local o="--output $OUT/$1 --overwrite"
  [ -n "$LIMIT" ] && o="$o --limit $LIMIT"
  [ "$DEVICE" = cpu ] && o="$o --device cpu --compile"  # the CPU dry run compiles too: the cache path runs
  echo "$o"
}

compile_art() {  # NAME TARGET PRECISION [TP]
  local name=$1 target=$2 precision=$3 tp=${4:-} quant=""
  [ "$precision" = fp8 ] && quant="--device $DEVICE $FP8_EXTRA"
  stamp "compile $name"
  # shellcheck disable=SC2086
  $H compile "$CK" --target "$target" --precision "$precision" ${tp:+--tp $tp} --force $quant -o "$A/$name"
  rm -rf "$A/$name/cache"  # a compile cache a run may have left in an earlier artifact of this name
  python3 -c "import json, sys; print(sys.argv[2], 'resources', json.dumps(json.load(open(sys.argv[1]))['resources']))" \
    "$A/$name/manifest.json" "$name" | tee -a "$OUT/compile-resources.txt"
}

timed_run() {  # NAME ARTIFACT RUN-LABEL [EXTRA OPTIONS]: one fresh process, its wall clock beside hsc's own
  local name=$1 art=$2 label=$3
  shift 3
  local t0 t1
  stamp "run $label"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2046,SC2086
  $H run "$art" $(run_opts "$label") "$@" | tail -6
  t1=$(date +%s.%N)
  python3 -c "import sys; print(f'{sys.argv[1]}: process wall {float(sys.argv[3]) - float(sys.argv[2]):.1f} s')" \
    "$label" "$t0" "$t1" | tee -a "$OUT/walls.txt"
}

one_gpu() {  # PRECISION
  local p=$1 art=$A/llama30b-h200x1-$1
  compile_art "llama30b-h200x1-$p" h200x1 "$p"
  timed_run "$p" "$art" "h200x1-$p-run1"
  timed_run "$p" "$art" "h200x1-$p-run2"
  rm -rf "$art"  # before the next 30B artifact: the disk holds one bf16 at a time
  if [ "$MODE" = x2 ]; then
    local tp_runs="1"
    [ "$p" = bf16 ] && tp_runs="1 2"
    for tp in $tp_runs; do
      local label=h200x2-$p-tp$tp
      compile_art "llama30b-$label" h200x2 "$p" "$tp"
      timed_run "$p" "$A/llama30b-$label" "$label" --nproc 2
      python3 docs/profiling/compare_runs.py "$OUT/h200x1-$p-run1/samples.jsonl" "$OUT/$label/samples.jsonl"
      rm -rf "$A/llama30b-$label"
    done
  fi
}

summary() {
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
walls = dict(line.split(": process wall ") for line in (out / "walls.txt").read_text().splitlines())
keys = ("verify_s", "load_s", "prepare_s", "warmup_s", "scoring_s", "write_s", "total_s")
print("run".ljust(22) + "".join(k.removesuffix("_s").rjust(9) for k in keys) + "  process  compile cache (hit/miss)  acc_norm")
for label, wall in walls.items():
    r = json.loads((out / label / "results.json").read_text())
    t = r["timings"]
    c = r["compile_cache"] or {}
    cache = f"{c.get('source')} ({c.get('fxgraph_cache_hit')}/{c.get('fxgraph_cache_miss')})"
    print(label.ljust(22) + "".join(f"{t[k]:9.1f}" for k in keys) + f"  {wall:>7}  {cache:>24}  {100 * r['acc_norm']:.2f}")
PY
}

steps() {
  set -E  # the ERR trap also fires inside functions
  trap 'stamp FAILED' ERR
  : > "$OUT/walls.txt"
  stamp "random checkpoint -> $CK"
  # shellcheck disable=SC2086
  if [ "$CK_LAYOUT" = hf ]; then
    # shellcheck disable=SC2086
    $H random-checkpoint --shape llama-30b --layout hf --force $EXTRA -o "$CK"
  else
    # shellcheck disable=SC2086
    $H random-checkpoint --shape llama-30b --shards 4 --no-checklist --force $EXTRA -o "$CK"
  fi
  du -sh "$CK"
  for p in bf16 fp8; do
    if wants $p; then one_gpu $p; fi
  done
  # keep only what the lead reads: results.json of each run (samples of the full set are large)
  find "$OUT" -name samples.jsonl -delete
  find "$OUT" -type d -name lm-eval -exec rm -rf {} +
  summary | tee "$OUT/summary.txt"
  stamp DONE
}

# shellcheck source=docs/profiling/detached.sh
source "$(dirname "$0")/detached.sh"
detached "$0" "$LOG" "$OUT" "$@"
