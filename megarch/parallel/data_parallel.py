"""Data parallelism on plain local tensors: gradient all-reduce, scalar reductions, ZeRO-1.

Why an explicit all-reduce rather than ``torch.nn.parallel.DistributedDataParallel``: the
training loop divides every micro-batch's loss by the token count of the *global* batch (summed
over data-parallel ranks first), so the gradients are to be *summed* over ranks, once, after the
last micro-batch; DDP averages and needs ``no_sync`` juggling for accumulation. The gradients
are reduced after accumulation in buckets of ``parallel.grad_bucket_mb`` (DDP's 25 MB by
default), so the extra memory is one bucket, not a flat copy of the whole model. This is the
post-backward path (``parallel.overlap_grad_reduce false``); the trainer's default launches each
bucket during the backward pass as its gradients become final (megarch.parallel.grad_reduce).

ZeRO-1 (optimizer state sharded over the data-parallel group) is
``torch.distributed.optim.ZeroRedundancyOptimizer`` around the same optimizer class and groups.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from megarch.parallel.collectives import Group, group_size

DEFAULT_BUCKET_MB = 25.0
"""Default bucket size of :func:`all_reduce_grads` (DDP's ``bucket_cap_mb``)."""


def all_reduce_grads(model: nn.Module, group: Group, bucket_mb: float = DEFAULT_BUCKET_MB
                     ) -> None:
    """Sum every gradient over the data-parallel ``group`` in place (missing ones count as 0).

    Gradients are taken in parameter order, per dtype, and packed into buckets of at most
    ``bucket_mb`` MiB: each bucket is copied into one reusable flat buffer, all-reduced and
    copied back, so the extra memory is one bucket per dtype at a time. A gradient larger than
    a bucket is all-reduced in place on its own (no copy; a non-contiguous one, which is rare,
    goes through a buffer of its size). The sums equal one flat all-reduce
    of everything bitwise on two ranks (a + b either way); with more ranks a collective's
    reduction order may depend on the buffer's layout, so they agree to float rounding.
    """
    if bucket_mb <= 0:
        raise ValueError(f"all_reduce_grads: bucket_mb={bucket_mb} must be > 0 "
                         "(parallel.grad_bucket_mb)")
    if group_size(group) == 1:
        return
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        _all_reduce_bucketed(same, group, int(bucket_mb * 2**20) // same[0].element_size())


def _all_reduce_bucketed(grads: list[torch.Tensor], group: Group, capacity: int) -> None:
    """All-reduce ``grads`` (one dtype) through buckets of at most ``capacity`` elements."""
    capacity = max(capacity, 1)
    small = [g for g in grads if g.numel() <= capacity or not g.is_contiguous()]
    buffer = None
    if small:
        size = min(capacity, sum(g.numel() for g in small))
        buffer = small[0].new_empty(max(size, max(g.numel() for g in small)))
    bucket: list[torch.Tensor] = []
    filled = 0

    def flush() -> None:
        nonlocal bucket, filled
        if not bucket:
            return
        flat = buffer[:filled]
        offset = 0
        for g in bucket:
            flat[offset:offset + g.numel()].view_as(g).copy_(g)
            offset += g.numel()
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket, filled = [], 0

    for grad in grads:
        if grad.numel() > capacity and grad.is_contiguous():
            dist.all_reduce(grad, group=group)  # its own bucket, in place
            continue
        if filled + grad.numel() > capacity:
            flush()
        bucket.append(grad)
        filled += grad.numel()
    flush()


def sum_over(values: list[float], group: Group) -> list[float]:
    """``values`` summed over ``group`` (float64, on CPU for gloo; on the current CUDA device
    for NCCL)."""
    if group_size(group) == 1:
        return list(values)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def any_over(flag: bool, group: Group) -> bool:
    """True on every rank when ``flag`` is True on any rank of ``group``."""
    return sum_over([float(flag)], group)[0] > 0


def zero1(optimizer: torch.optim.Optimizer, group: Group, bucket_view: bool = False
          ) -> ZeroRedundancyOptimizer:
    """The same optimizer (class, hyper-parameters, parameter groups) with its state sharded
    over the data-parallel ``group`` (ZeRO stage 1). The result's ``state_dict`` needs
    ``consolidate_state_dict(to=0)`` on every rank of the group first. ``bucket_view``: the
    parameters become views of one flat bucket per owner, so that the updated parameters go
    out in one broadcast per rank (an all-gather in ``dp`` pieces) instead of one each."""
    cls = type(optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    options = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [g for g in optimizer.param_groups if g["params"]]
    first = {k: v for k, v in groups[0].items() if k in accepted}
    zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=cls, process_group=group,
                                   parameters_as_bucket_view=bucket_view,
                                   **{**options, **first})
    for extra in groups[1:]:
        zero.add_param_group({k: v for k, v in extra.items() if k in accepted | {"params"}})
    return zero
