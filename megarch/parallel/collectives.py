"""Autograd-aware collectives for tensor parallelism on plain local tensors (Megatron's
mappings), plus gradient all-reduce helpers.

Convention: within a tensor-parallel group every rank holds the same *replicated* activations
(the residual stream) and computes the same replicated loss; each rank back-propagates its own
copy. Hence:

- :func:`copy_to_tp` (into a column-parallel layer): identity forward, all-reduce backward (each
  rank's shard contributes part of the input's gradient);
- :func:`reduce_from_tp` (out of a row-parallel layer, the vocab-parallel embedding and the
  loss's partial sums): all-reduce forward, identity backward (the output is replicated);
- :func:`gather_from_tp`: all-gather along a dim forward, keep this rank's slice backward.

Sequence parallelism (Megatron-SP) replaces the pair outside the tensor-parallel regions: the
residual stream, norms and dropout hold this rank's chunk of the sequence [batch, len / tp, d]:

- :func:`gather_from_sequence` (into a column-parallel layer): all-gather along the sequence
  forward, reduce-scatter of the gradient backward;
- :func:`reduce_scatter_to_sequence` (out of a row-parallel layer): reduce-scatter forward,
  all-gather backward;
- :func:`scatter_to_sequence`: keep this rank's chunk forward, all-gather backward.

:func:`enter_tp` / :func:`exit_tp` pick the pair. A ``None`` group, or a group of one process,
makes every function the identity, so the same model code runs in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    """Processes in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = group_size(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[group_rank(ctx.group)].contiguous(), None, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group, 1), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _my_chunk(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group, 1), None


def _my_chunk(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[1] % size:
        raise ValueError(f"sequence parallelism: length {x.shape[1]} is not divisible by the "
                         f"tensor-parallel size {size}")
    return x.chunk(size, dim=1)[group_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over the group, keep this rank's sequence chunk (gloo has no reduce-scatter)."""
    return _my_chunk(_all_reduce(x, group), group)


def gather_from_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, len / tp, ...] -> [b, len, ...] forward; gradient reduce-scattered backward."""
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Partial [b, len, ...] -> summed [b, len / tp, ...] forward; all-gather backward."""
    return x if group_size(group) == 1 else _ReduceScatterSequence.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Replicated [b, len, ...] -> this rank's [b, len / tp, ...]; all-gather backward."""
    return x if group_size(group) == 1 else _ScatterSequence.apply(x, group)


def enter_tp(x: torch.Tensor, group: Group, sequence_parallel: bool = False) -> torch.Tensor:
    """Into a column-parallel region: :func:`gather_from_sequence` or :func:`copy_to_tp`."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp(x: torch.Tensor, group: Group, sequence_parallel: bool = False) -> torch.Tensor:
    """Out of a row-parallel region: :func:`reduce_scatter_to_sequence` or
    :func:`reduce_from_tp`."""
    return reduce_scatter_to_sequence(x, group) if sequence_parallel else reduce_from_tp(x, group)


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel op)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward (output of a row-parallel op)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """All-gather of the shards along ``dim`` forward, this rank's slice backward."""
    if group_size(group) == 1:
        return x
    return _GatherFromTP.apply(x, group, dim % x.dim())


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Element-wise max over the group (no gradient: use on detached values)."""
    return _all_reduce(x.detach(), group, dist.ReduceOp.MAX)


def all_reduce_tensors(tensors: list[torch.Tensor], group: Group) -> None:
    """Sum ``tensors`` in place over ``group`` with one flat all-reduce per dtype."""
    if group_size(group) == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
