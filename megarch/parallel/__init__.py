"""Parallelism: the context of groups and sizes, tensor-parallel collectives and sharding,
data-parallel gradient reduction and ZeRO-1, pipeline stages for all three architectures with
1F1B and interleaved 1F1B schedules, resharding, and a process spawner for tests.

Modules and their public API:

- context: :class:`ParallelContext` (sizes, ranks, groups; ``single()`` / ``build(tp, pp, dp)``),
  :func:`init_distributed` (torchrun's environment; gloo on CPU, NCCL on GPUs)
- collectives: :func:`copy_to_tp`, :func:`reduce_from_tp`, :func:`gather_from_tp` (autograd-aware,
  Megatron's mappings on plain tensors), ``all_reduce_tensors``
- tensor_parallel: :func:`set_partition_dim` / :func:`partition_dims` (each parameter's TP
  partition, declared by the layer that builds it), :func:`load_full_state_dict`,
  :func:`gather_full_state_dict`, :func:`gather_grads`, :func:`clip_grad_norm`
- rng: :class:`TensorParallelDropout`, :func:`split_dropout` (per-TP-rank masks where
  activations are split, the global stream where replicated), :func:`dropout_seed`
- data_parallel: ``all_reduce_grads`` (after the backward), ``sum_over``, ``any_over``, ``zero1``
- grad_reduce: ``GradReducer`` (bucketed reduction overlapped with the last backward, ZeRO-1
  reduce-to-owner, bf16 option), ``build_grad_reducer`` (the Trainer's)
- pipeline: ``embedding_group`` (the stages themselves are the model's:
  ``megarch.model.build_stage``)
- pipeline_schedules: ``one_f_one_b``, ``interleaved_one_f_one_b``, ``forward_only``
- reshard: ``merge_tp_model`` / ``split_tp_model``, ``merge_tp_optimizer`` /
  ``split_tp_optimizer``
- spawn: ``spawn(world_size)(fn, *args)``, ``SpawnError``, ``free_port``

The model takes the context (``build_model(cfg, device, ctx)``) and the loss the TP group
(``lm_loss(..., tp_group=...)``); the Trainer builds the context from ``TrainConfig.parallel``.
"""

from megarch.parallel.collectives import copy_to_tp, gather_from_tp, reduce_from_tp
from megarch.parallel.context import ParallelContext, init_distributed
from megarch.parallel.tensor_parallel import (
    clip_grad_norm,
    gather_full_state_dict,
    gather_grads,
    load_full_state_dict,
    partition_dims,
    set_partition_dim,
)

__all__ = [
    "ParallelContext",
    "clip_grad_norm",
    "copy_to_tp",
    "gather_from_tp",
    "gather_full_state_dict",
    "gather_grads",
    "init_distributed",
    "load_full_state_dict",
    "partition_dims",
    "reduce_from_tp",
    "set_partition_dim",
]
