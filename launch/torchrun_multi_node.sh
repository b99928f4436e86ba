#!/usr/bin/env bash
# NNODES nodes x GPUS_PER_NODE processes, c10d rendezvous at MASTER_ADDR:MASTER_PORT.
# Run the same command on every node (or let launch/slurm_multi_node.sbatch do it):
#
#   NNODES=4 GPUS_PER_NODE=8 MASTER_ADDR=node001 TP=8 PRESET=cd_flm \
#       launch/torchrun_multi_node.sh --run.out_dir /shared/runs/cd_flm
#
# Before torchrun starts (and with DRY_RUN=1) it refuses NNODES x GPUS_PER_NODE processes that
# TP x PP does not divide, and NNODES > 1 with a loopback MASTER_ADDR (the default).
#
# Extra variables: RDZV_ID (default megarch, or SLURM_JOB_ID), and those of launch/common.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "${HERE}/common.sh"
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megarch}}
train_args "$@"
check_layout
run_or_print "${PYTHON}" -m torch.distributed.run \
  --nnodes "${NNODES}" --nproc-per-node "${GPUS_PER_NODE}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${RDZV_ID}" \
  "${TRAIN_ARGS[@]}"
