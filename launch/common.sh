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
#   MICRO_BATCH, ACTIVATION_CHECKPOINTING, ZERO1
#                  when set: --run.micro_batch, --model.activation_checkpointing (true/false),
#                  --parallel.zero1 (true/false), before EXTRA and the script's arguments
#   RECIPE         a launch/recipes/<name>.env layout for A100-80GB nodes (e.g. cd_flm): sets
#                  PRESET, GPUS_PER_NODE, TP, PP, MICRO_BATCH, ACTIVATION_CHECKPOINTING and
#                  ZERO1; a variable already set in the environment wins

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE_KEYS="PRESET GPUS_PER_NODE TP PP MICRO_BATCH ACTIVATION_CHECKPOINTING ZERO1"

# Set the variables of launch/recipes/${RECIPE}.env that the environment does not set.
load_recipe() {
  local file="${LAUNCH_DIR}/recipes/${RECIPE}.env" key value
  if [[ ! -f "${file}" ]]; then
    echo "RECIPE=${RECIPE}: no ${file}; use one of:" \
      "$(cd "${LAUNCH_DIR}/recipes" && ls -- *.env | sed 's/\.env$//' | tr '\n' ' ')" >&2
    exit 2
  fi
  while IFS='=' read -r key value; do
    [[ -z "${key}" || "${key}" == \#* ]] && continue
    if [[ " ${RECIPE_KEYS} " != *" ${key} "* ]]; then
      echo "${file}: unknown variable ${key}; a recipe sets ${RECIPE_KEYS}" >&2
      exit 2
    fi
    [[ -n "${!key:-}" ]] || printf -v "${key}" '%s' "${value}"
  done < "${file}"
}
[[ -z "${RECIPE:-}" ]] || load_recipe

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

# The megarch-train part of the command: preset, parallel sizes, the recipe's settings, EXTRA,
# then the script's args (later overrides win).
train_args() {
  # shellcheck disable=SC2206  # EXTRA is meant to be word-split
  local extra=(${EXTRA}) recipe=()
  [[ -z "${MICRO_BATCH:-}" ]] || recipe+=(--run.micro_batch "${MICRO_BATCH}")
  [[ -z "${ACTIVATION_CHECKPOINTING:-}" ]] ||
    recipe+=(--model.activation_checkpointing "${ACTIVATION_CHECKPOINTING}")
  [[ -z "${ZERO1:-}" ]] || recipe+=(--parallel.zero1 "${ZERO1}")
  TRAIN_ARGS=(-m megarch.train --preset "${PRESET}" --parallel.tp "${TP}" --parallel.pp "${PP}"
              "${recipe[@]}" "${extra[@]}" "$@")
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
