"""How tensor parallelism shards parameters, and moving between full and sharded weights.

The model layers (megarch.model) build each rank's shard, insert the collectives and *declare*
each sharded parameter's partition dim where the layer is built (:func:`set_partition_dim`,
Megatron's tensor-model-parallel attributes); everything that shards, gathers, reshards,
initialises, clips or updates reads that declaration (:func:`partition_dims`), never a rule on
parameter names. The layers declare:

==============================================  =====  ==============================
parameter                                       dim    why
==============================================  =====  ==============================
embedding and untied output projection          0      vocab-parallel rows
``q/k/v``, ``wi_gate/wi_up`` weights            0      column-parallel outputs (heads / units)
``o``, ``wo`` weights                           1      row-parallel inputs
relative-bias tables                            1      one column per head
anything undeclared (norm weights)              —      replicated
==============================================  =====  ==============================

Rank r holds the r-th of ``tp`` equal chunks along that dim (``torch.chunk`` order), so heads
``[r * H/tp, (r + 1) * H/tp)`` and their rows of q, k, v and columns of o stay together. With
grouped-query attention (``model.n_kv_heads`` KV heads, each serving H / KV consecutive query
heads) the same chunking gives rank r the KV heads ``[r * KV/tp, (r + 1) * KV/tp)``: exactly
those its query heads read, as long as tp divides KV (``ModelConfig.validate_tp`` refuses
otherwise, since a k/v weight could split evenly in the middle of a head).

The declaration lives on the owning module (a dict of parameter name -> dim), not on the
``nn.Parameter``: ``Module.to_empty`` (how a model built on the meta device is materialised)
replaces the parameter objects and drops any attribute set on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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

PARTITION_ATTR = "tp_partition_dims"
"""The module attribute holding its parameters' partition dims (parameter name -> dim)."""


def set_partition_dim(module: nn.Module, param: str, dim: int) -> nn.Module:
    """Declare that ``module``'s parameter ``param`` is split along ``dim`` across the
    tensor-parallel ranks (called where the layer is built); returns ``module``."""
    if not isinstance(getattr(module, param, None), nn.Parameter):
        raise ValueError(f"{type(module).__name__} has no parameter {param!r} to partition")
    module.__dict__.setdefault(PARTITION_ATTR, {})[param] = dim
    return module


def partition_dims(model: nn.Module) -> dict[str, int | None]:
    """Every parameter of ``model`` by its ``named_parameters`` name -> its declared
    partition dim (None: replicated on every TP rank)."""
    out: dict[str, int | None] = {}
    for prefix, module in model.named_modules():
        declared = module.__dict__.get(PARTITION_ATTR, {})
        for name, _ in module.named_parameters(recurse=False):
            out[f"{prefix}.{name}" if prefix else name] = declared.get(name)
    return out


def shard_tensor(full: torch.Tensor, dim: int | None, tp_rank: int, tp_size: int,
                 name: str = "tensor") -> torch.Tensor:
    """This rank's shard along partition dim ``dim`` (None: replicated) of a full tensor."""
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} does not split in {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor],
                         group: Group) -> None:
    """Copy a single-process (TP1) state dict into ``model``, this rank's shard of each tensor."""
    rank, size, dims = group_rank(group), group_size(group), partition_dims(model)
    for name, param in model.state_dict().items():
        param.copy_(shard_tensor(full[name], dims.get(name), rank, size, name))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The TP1 state dict of a TP-sharded ``model`` (collective: every TP rank gets it)."""
    dims = partition_dims(model)
    return {name: gather_tensor(t.detach(), dims.get(name), group)
            for name, t in model.state_dict().items()}


def gather_tensor(local: torch.Tensor, dim: int | None, group: Group) -> torch.Tensor:
    """The full tensor (a parameter or its gradient) from every rank's shard along ``dim``."""
    if dim is None:
        return local
    return _all_gather(local, group, dim)


def reduce_sequence_parallel_grads(model: nn.Module, group: Group) -> None:
    """Sum the replicated parameters' gradients over the TP group: under sequence parallelism
    each rank saw only its chunk of the sequence in the norms (call after the backward)."""
    dims = partition_dims(model)
    grads = [p.grad for n, p in model.named_parameters()
             if p.grad is not None and dims[n] is None]
    all_reduce_tensors(grads, group)


def gather_grads(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """A copy of the full gradient of every parameter with one (collective; None grads become
    zeros)."""
    out, dims = {}, partition_dims(model)
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        out[name] = gather_tensor(grad.detach(), dims[name], group).clone()
    return out


def grad_norm_sq(model: nn.Module, group: Group, stage_group: Group = None,
                 skip: frozenset[str] = frozenset()) -> torch.Tensor:
    """Squared global gradient norm of a TP-sharded (and pipeline-staged) model: sharded
    gradients are summed over the TP ``group``, replicated ones (identical on every TP rank)
    counted once, then the stages' totals summed over ``stage_group`` (the pipeline group).
    ``skip`` names parameters counted elsewhere (the last stage's copy of a tied embedding)."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    dims = partition_dims(model)
    for name, param in model.named_parameters():
        if param.grad is None or name in skip:
            continue
        sq = param.grad.detach().double().pow(2).sum().cpu()
        if dims[name] is None:
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
                   skip: frozenset[str] = frozenset(), norm: float | None = None) -> float:
    """Global gradient norm (see :func:`grad_norm_sq`) before clipping; clips to ``max_norm``
    when it is > 0 and the norm is finite. Every rank returns, and applies, the same norm.
    ``norm``: the norm already computed (no second reduction)."""
    if norm is None:
        norm = math.sqrt(float(grad_norm_sq(model, group, stage_group, skip)))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(coef)
    return norm
