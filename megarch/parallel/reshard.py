"""Resharding tensor-parallel state: which dim each model and optimizer tensor is split along,
cutting one rank's shard out of another TP size's shards, and whole-state-dict merge / split.

Shards follow each parameter's declared partition dim
(:func:`megarch.parallel.tensor_parallel.partition_dims` of the model, passed in as ``dims``:
parameter name -> dim or None; rank r holds the r-th of ``tp`` equal chunks).
Optimizer state tensors follow their parameter (:func:`state_split_dim`):

- shaped like the parameter (AdamW's ``exp_avg`` / ``exp_avg_sq``, Adafactor's ``variance``
  of a vector): split along the parameter's dim;
- Adafactor's ``row_var`` ``[rows, 1]``: split along dim 0 when the parameter is, else
  replicated; ``col_var`` ``[1, cols]``: split along its last dim when the parameter is split
  along dim 1, else replicated (a replicated factor is taken from rank 0);
- scalars (``step``) and non-tensors: taken from rank 0.

Optimizer state dicts are keyed by index; :func:`optimizer_param_names` maps each index to its
parameter's name (the single-process model's name on every rank and pipeline stage).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

Dims = Mapping[str, int | None]
"""Parameter name -> partition dim (None: replicated), as :func:`partition_dims` gives."""


def state_split_dim(dim: int | None, key: str, value: object) -> int | None:
    """The dim along which optimizer state ``key`` of a parameter split along ``dim`` is split
    across TP ranks (None: replicated, a scalar or not a tensor)."""
    if dim is None or not torch.is_tensor(value) or value.dim() == 0:
        return None
    if key == "row_var":
        return 0 if dim == 0 else None
    if key == "col_var":
        return value.dim() - 1 if dim == value.dim() - 1 else None
    return dim


def take_shard(parts: Sequence[torch.Tensor], dim: int | None, tp_rank: int,
               tp: int) -> torch.Tensor:
    """Rank ``tp_rank`` of ``tp``'s shard of the tensor whose shards (along ``dim``) are
    ``parts`` (any number of them; None: replicated, ``parts[0]``). Only the parts overlapping
    the wanted range are read, so memory-mapped parts cost only the bytes taken. A new tensor."""
    if dim is None:
        return parts[0].clone()
    total = sum(part.shape[dim] for part in parts)
    if total % tp:
        raise ValueError(f"dim {dim} of size {total} does not split into tp={tp} equal shards")
    start, stop = tp_rank * total // tp, (tp_rank + 1) * total // tp
    pieces, offset = [], 0
    for part in parts:
        size = part.shape[dim]
        low, high = max(start, offset), min(stop, offset + size)
        if low < high:
            pieces.append(part.narrow(dim, low - offset, high - low))
        offset += size
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0].clone()


def merge_tp_model(shards: list[dict[str, torch.Tensor]], dims: Dims) -> dict[str, torch.Tensor]:
    """The single-process state dict from the state dicts of TP ranks 0..tp-1."""
    return {name: take_shard([s[name] for s in shards], dims.get(name), 0, 1)
            for name in shards[0]}


def split_tp_model(full: dict[str, torch.Tensor], tp: int,
                   dims: Dims) -> list[dict[str, torch.Tensor]]:
    """The state dicts of TP ranks 0..tp-1 from a single-process one."""
    return [{n: take_shard([t], dims.get(n), r, tp) for n, t in full.items()}
            for r in range(tp)]


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer state index (param-group order)."""
    return [name for group in optimizer_group_names(model, optimizer) for name in group]


def optimizer_group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each of the optimizer's param groups, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def reshard_param_state(dim: int | None, states: Sequence[dict], tp_rank: int,
                        tp: int) -> dict:
    """Rank ``tp_rank`` of ``tp``'s optimizer state of a parameter split along ``dim`` from
    the states of the saved TP ranks ``states`` (rank order)."""
    out = {}
    for key, value in states[0].items():
        if torch.is_tensor(value):
            out[key] = take_shard([s[key] for s in states], state_split_dim(dim, key, value),
                                  tp_rank, tp)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_tp_optimizer(shards: list[dict], names: list[str], dims: Dims) -> dict:
    """The single-process optimizer state dict from TP ranks' ones; ``names``: each state
    index's parameter name."""
    merged = copy.deepcopy({k: v for k, v in shards[0].items() if k != "state"})
    merged["state"] = {index: reshard_param_state(dims.get(names[index]),
                                                    [s["state"][index] for s in shards], 0, 1)
                       for index in shards[0]["state"]}
    return merged


def split_tp_optimizer(full: dict, names: list[str], tp: int, dims: Dims) -> list[dict]:
    """TP ranks' optimizer state dicts from a single-process one (inverse of the merge)."""
    out = []
    for rank in range(tp):
        shard = copy.deepcopy({k: v for k, v in full.items() if k != "state"})
        shard["state"] = {index: reshard_param_state(dims.get(names[index]), [state], rank, tp)
                          for index, state in full["state"].items()}
        out.append(shard)
    return out
