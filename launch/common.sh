# Shared by the launch scripts (sourced, not run): defaults and the dry-run runner.
#
# Environment (all optional):
#   GPUS_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1); set it
#                  where no GPU is visible (a login node) to the compute nodes' GPU count
#   NNODES         nodes (default 1)
#   MASTER_ADDR    rendezvous host (default 127.0.0.1; NNODES > 1 needs a host every node
#                  reaches, e.g. the first node's name)
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
# Where GPUS_PER_NODE came from: env, recipe, nvidia-smi or none (no GPU visible: 1).
GPUS_FROM=env
[[ -n "${GPUS_PER_NODE:-}" ]] || GPUS_FROM=recipe
[[ -z "${RECIPE:-}" ]] || load_recipe
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  GPUS_FROM=nvidia-smi
  [[ "${GPUS_PER_NODE}" -ge 1 ]] || { GPUS_PER_NODE=1; GPUS_FROM=none; }
fi
NNODES=${NNODES:-1}
# Where MASTER_ADDR came from, for check_layout's message (the SLURM script sets its own).
[[ -n "${MASTER_ADDR:-}" ]] || MASTER_FROM=default
MASTER_FROM=${MASTER_FROM:-env}
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

launch_error() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Refuse, before torchrun starts (and in a dry run), a layout that cannot run: sizes that are
# not positive integers, NNODES x GPUS_PER_NODE processes that TP x PP does not divide, and
# several nodes meeting at a loopback MASTER_ADDR.
check_layout() {
  local name value world model where origin
  for name in NNODES GPUS_PER_NODE TP PP; do
    value=${!name}
    [[ "${value}" =~ ^[1-9][0-9]*$ ]] ||
      launch_error "${name}=${value}: must be a positive integer"
  done
  world=$((NNODES * GPUS_PER_NODE))
  model=$((TP * PP))
  if (( world % model != 0 )); then
    where=""
    [[ -z "${RECIPE:-}" ]] || where=" (the layout of launch/recipes/${RECIPE}.env)"
    local msg="NNODES x GPUS_PER_NODE = ${NNODES} x ${GPUS_PER_NODE} = ${world} processes is"
    msg+=" not a multiple of TP x PP = ${TP} x ${PP} = ${model}${where}: change NNODES,"
    msg+=" GPUS_PER_NODE, TP or PP"
    if [[ "${GPUS_FROM}" == none ]]; then
      msg+="; no GPU is visible here, so GPUS_PER_NODE defaulted to 1: on a login node set it"
      msg+=" to the GPUs of each compute node, e.g. GPUS_PER_NODE=8"
    fi
    launch_error "${msg}"
  fi
  if (( NNODES > 1 )) && [[ "${MASTER_ADDR}" =~ ^(127\.|localhost$|::1$|0\.0\.0\.0$) ]]; then
    case "${MASTER_FROM}" in
      default) origin=" (the default)" ;;
      slurm-fallback) origin=" (scontrol could not read the allocation's first node)" ;;
      *) origin="" ;;
    esac
    launch_error "NNODES=${NNODES} with MASTER_ADDR=${MASTER_ADDR}${origin}: every node" \
      "would wait for its own loopback; set MASTER_ADDR to a host all nodes reach (the" \
      "first node's hostname, e.g. MASTER_ADDR=node001)"
  fi
  if [[ "${GPUS_FROM}" == none ]]; then
    echo "$(basename "$0"): note: no GPU is visible here (nvidia-smi lists none), so" \
      "GPUS_PER_NODE=1 (one CPU process per node); on a login node, set GPUS_PER_NODE to" \
      "the GPUs of each compute node (e.g. GPUS_PER_NODE=8)" >&2
  fi
  return 0
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
