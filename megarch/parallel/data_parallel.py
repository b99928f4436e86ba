"""Data parallelism on plain local tensors: gradient all-reduce, scalar reductions, ZeRO-1.

Why an explicit all-reduce rather than ``torch.nn.parallel.DistributedDataParallel``: the
training loop divides every micro-batch's loss by the token count of the *global* batch (summed
over data-parallel ranks first), so the gradients are to be *summed* over ranks, once, after the
last micro-batch; DDP averages and needs ``no_sync`` juggling for accumulation. One flat
all-reduce per dtype after accumulation is the same communication as DDP without overlap; the
overlap with the backward pass is what DDP's buckets would add on GPUs (a later optimisation).

ZeRO-1 (optimizer state sharded over the data-parallel group) is
``torch.distributed.optim.ZeroRedundancyOptimizer`` around the same optimizer class and groups.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from megarch.parallel.collectives import Group, all_reduce_tensors, group_size


def all_reduce_grads(model: nn.Module, group: Group) -> None:
    """Sum every gradient over the data-parallel ``group`` in place (missing ones count as 0)."""
    if group_size(group) == 1:
        return
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    all_reduce_tensors([p.grad for p in model.parameters() if p.grad is not None], group)


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


def zero1(optimizer: torch.optim.Optimizer, group: Group) -> ZeroRedundancyOptimizer:
    """The same optimizer (class, hyper-parameters, parameter groups) with its state sharded
    over the data-parallel ``group`` (ZeRO stage 1). The result's ``state_dict`` needs
    ``consolidate_state_dict(to=0)`` on every rank of the group first."""
    cls = type(optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    options = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [g for g in optimizer.param_groups if g["params"]]
    first = {k: v for k, v in groups[0].items() if k in accepted}
    zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=cls, process_group=group,
                                   **{**options, **first})
    for extra in groups[1:]:
        zero.add_param_group({k: v for k, v in extra.items() if k in accepted | {"params"}})
    return zero
