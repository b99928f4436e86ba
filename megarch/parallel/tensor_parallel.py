"""Which parameters tensor parallelism shards, and moving between full and sharded weights.

The model layers (megarch.model) build each rank's shard and insert the collectives; this module
knows the layout by parameter name (one rule for every architecture):

==============================================  =====  ==============================
parameter (last two name parts)                 dim    why
==============================================  =====  ==============================
``embed.weight``, ``lm_head.weight``            0      vocab-parallel rows
``q/k/v.weight``, ``wi_gate/wi_up.weight``      0      column-parallel outputs (heads / units)
``o.weight``, ``wo.weight``                     1      row-parallel inputs
``rel_bias.table``                              1      one column per head
anything else (norm weights)                    —      replicated
==============================================  =====  ==============================

Rank r holds the r-th of ``tp`` equal chunks along that dim (``torch.chunk`` order), so heads
``[r * H/tp, (r + 1) * H/tp)`` and their rows of q, k, v and columns of o stay together.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megarch.parallel.collectives import (
    Group,
    _all_gather,
    all_reduce_tensors,
    group_rank,
    group_size,
)

_ROW_SHARDED = {"embed.weight", "lm_head.weight", "q.weight", "k.weight", "v.weight",
                "wi_gate.weight", "wi_up.weight"}
_COLUMN_SHARDED = {"o.weight", "wo.weight", "rel_bias.table"}


def tp_split_dim(name: str) -> int | None:
    """The dim along which parameter ``name`` is sharded across TP ranks (None: replicated)."""
    tail = ".".join(name.split(".")[-2:])
    if tail in _ROW_SHARDED:
        return 0
    if tail in _COLUMN_SHARDED:
        return 1
    return None


def shard_tensor(full: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of the full tensor of parameter ``name``."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} does not split in {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], group: Group) -> None:
    """Copy a single-process (TP1) state dict into ``model``, this rank's shard of each tensor."""
    rank, size = group_rank(group), group_size(group)
    for name, param in model.state_dict().items():
        param.copy_(shard_tensor(full[name], name, rank, size))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The TP1 state dict of a TP-sharded ``model`` (collective: every TP rank gets it)."""
    return {name: gather_tensor(t.detach(), name, group)
            for name, t in model.state_dict().items()}


def gather_tensor(local: torch.Tensor, name: str, group: Group) -> torch.Tensor:
    """The full tensor of parameter ``name`` (or of its gradient) from every rank's shard."""
    dim = tp_split_dim(name)
    if dim is None:
        return local
    return _all_gather(local, group, dim)


def reduce_sequence_parallel_grads(model: nn.Module, group: Group) -> None:
    """Sum the replicated parameters' gradients over the TP group: under sequence parallelism
    each rank saw only its chunk of the sequence in the norms (call after the backward)."""
    grads = [p.grad for n, p in model.named_parameters()
             if p.grad is not None and tp_split_dim(n) is None]
    all_reduce_tensors(grads, group)


def gather_grads(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """A copy of the full gradient of every parameter with one (collective; None grads become
    zeros)."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        out[name] = gather_tensor(grad.detach(), name, group).clone()
    return out


def grad_norm_sq(model: nn.Module, group: Group, stage_group: Group = None,
                 skip: frozenset[str] = frozenset()) -> torch.Tensor:
    """Squared global gradient norm of a TP-sharded (and pipeline-staged) model: sharded
    gradients are summed over the TP ``group``, replicated ones (identical on every TP rank)
    counted once, then the stages' totals summed over ``stage_group`` (the pipeline group).
    ``skip`` names parameters counted elsewhere (the last stage's copy of a tied embedding)."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for name, param in model.named_parameters():
        if param.grad is None or name in skip:
            continue
        sq = param.grad.detach().double().pow(2).sum().cpu()
        if tp_split_dim(name) is None:
            replicated += sq
        else:
            sharded += sq
    if group_size(group) > 1:
        sharded = _reduce_sum(sharded, group)
    total = sharded + replicated
    return _reduce_sum(total, stage_group) if group_size(stage_group) > 1 else total


def _reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def clip_grad_norm(model: nn.Module, max_norm: float, group: Group, stage_group: Group = None,
                   skip: frozenset[str] = frozenset()) -> float:
    """Global gradient norm (see :func:`grad_norm_sq`) before clipping; clips to ``max_norm``
    when it is > 0 and the norm is finite. Every rank returns, and applies, the same norm."""
    norm = math.sqrt(float(grad_norm_sq(model, group, stage_group, skip)))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(coef)
    return norm
