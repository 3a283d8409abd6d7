# Sourced by the detached device scripts (detached.sh, hf_checks.sh).
# wait_log LOG OUT [SECONDS [LINES]]: wait until LOG says DONE or FAILED (or SECONDS pass), copy it to OUT,
# print its last LINES lines.
wait_log() {
  local log=$1 out=$2
  for _ in $(seq 1 "${3:-560}"); do
    grep -q "  DONE$\|  FAILED$" "$log" && break
    sleep 1
  done
  cp "$log" "$out/log.txt"
  tail -n "${4:-20}" "$log"
}
