# Shared by the launch scripts (sourced, not run): defaults and the dry-run runner.
#
# Environment (all optional):
#   GPUS_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
#   NNODES         nodes (default 1)
#   MASTER_ADDR    rendezvous host (default 127.0.0.1)
#   MASTER_PORT    rendezvous port (default 29500)
#   PRESET         megarch-train preset (default cd_flm_tiny)
#   TP, PP         tensor / pipeline-parallel sizes (default 1); DP is the rest
#   EXTRA          more megarch-train arguments, word-split (e.g. "--run.steps 50")
#   PYTHON         the interpreter with megarch installed (default python)
#   DRY_RUN=1      print the exact command instead of running it

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "${GPUS_PER_NODE}" -ge 1 ]] || GPUS_PER_NODE=1
fi
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PRESET=${PRESET:-cd_flm_tiny}
TP=${TP:-1}
PP=${PP:-1}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}

# The megarch-train part of the command: preset, parallel sizes, EXTRA, then the script's args.
train_args() {
  # shellcheck disable=SC2206  # EXTRA is meant to be word-split
  local extra=(${EXTRA})
  TRAIN_ARGS=(-m megarch.train --preset "${PRESET}" --parallel.tp "${TP}" --parallel.pp "${PP}"
              "${extra[@]}" "$@")
}

# Run "$@", or print it (shell-quoted, one line) when DRY_RUN=1.
run_or_print() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
    return 0
  fi
  exec "$@"
}
