#!/usr/bin/env bash
# One node, GPUS_PER_NODE processes (torchrun, static rendezvous on MASTER_ADDR:MASTER_PORT).
#
#   launch/torchrun_single_node.sh                                  # cd_flm_tiny on every GPU
#   GPUS_PER_NODE=8 TP=2 PRESET=cd_flm launch/torchrun_single_node.sh --run.steps 1000
#   DRY_RUN=1 TP=2 launch/torchrun_single_node.sh                   # print the command only
#
# Variables: see launch/common.sh. On a CPU-only machine the trainer uses gloo.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "${HERE}/common.sh"
[[ "${NNODES}" == 1 ]] ||
  launch_error "NNODES=${NNODES}: this script runs one node; use launch/torchrun_multi_node.sh"
train_args "$@"
check_layout
run_or_print "${PYTHON}" -m torch.distributed.run \
  --nnodes 1 --nproc-per-node "${GPUS_PER_NODE}" \
  --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
  "${TRAIN_ARGS[@]}"
