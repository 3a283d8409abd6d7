# Sourced by the device scripts (compile_30b.sh, run_real_30b.sh): run their `steps` detached, so that the
# work outlives a device call's 10-minute limit, and wait for it in later calls.
#   detached SCRIPT LOG OUT start|steps|wait [SECONDS [LINES]]
# start: launch `bash SCRIPT steps` detached, appending to LOG; steps: run them here (the caller defines
# `steps`); wait: block until LOG says DONE or FAILED, or SECONDS pass, copy LOG to OUT, print its tail.
detached() {
  local script=$1 log=$2 out=$3
  shift 3
  case "${1:-}" in
    start)
      : > "$log"
      setsid nohup bash "$script" steps >> "$log" 2>&1 < /dev/null &
      echo "started; log: $log"
      ;;
    steps)
      steps
      ;;
    wait)
      # shellcheck source=docs/profiling/wait_log.sh
      . "$(dirname "$script")/wait_log.sh"
      wait_log "$log" "$out" "${2:-560}" "${3:-20}"
      ;;
    *)
      echo "usage: bash $script start|wait [SECONDS [LINES]]|steps" >&2
      exit 2
      ;;
  esac
}
