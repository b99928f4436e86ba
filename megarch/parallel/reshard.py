"""Resharding tensor-parallel state dicts: merge TP shards into the single-process layout, or
split a single-process state dict for another TP size (model and AdamW-style optimizer state).

Shards follow :func:`megarch.parallel.tensor_parallel.tp_split_dim`; an optimizer's per-parameter
state tensors shaped like their parameter (AdamW's ``exp_avg``, ``exp_avg_sq``) are split and
merged along the same dim, scalars (``step``) are taken from rank 0. Factored states
(Adafactor's row / column moments) are not shard-exact and are refused.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from megarch.parallel.tensor_parallel import shard_tensor, tp_split_dim


def merge_tp_model(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The single-process state dict from the state dicts of TP ranks 0..tp-1."""
    merged = {}
    for name, first in shards[0].items():
        dim = tp_split_dim(name)
        merged[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return merged


def split_tp_model(full: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """The state dicts of TP ranks 0..tp-1 from a single-process one."""
    return [{n: shard_tensor(t, n, r, tp).clone() for n, t in full.items()} for r in range(tp)]


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer state index (param-group order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _state_tensors(state: dict, param_shape: torch.Size, name: str) -> None:
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape != param_shape:
            raise ValueError(f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, "
                             f"not its parameter's {tuple(param_shape)}: factored states "
                             "(Adafactor) cannot be resharded exactly")


def merge_tp_optimizer(shards: list[dict], names: list[str],
                       shapes: list[torch.Size]) -> dict:
    """The single-process optimizer state dict from TP ranks' ones. ``names`` / ``shapes``:
    each state index's parameter name and *shard* shape."""
    merged = copy.deepcopy({k: v for k, v in shards[0].items() if k != "state"})
    merged["state"] = {}
    for index, state in shards[0]["state"].items():
        name, dim = names[index], tp_split_dim(names[index])
        _state_tensors(state, shapes[index], name)
        merged["state"][index] = {
            key: (torch.cat([s["state"][index][key] for s in shards], dim=dim)
                  if dim is not None and torch.is_tensor(value) and value.dim() > 0 else value)
            for key, value in state.items()
        }
    return merged


def split_tp_optimizer(full: dict, names: list[str], tp: int) -> list[dict]:
    """TP ranks' optimizer state dicts from a single-process one (inverse of the merge)."""
    out = []
    for rank in range(tp):
        shard = copy.deepcopy({k: v for k, v in full.items() if k != "state"})
        shard["state"] = {
            index: {key: (shard_tensor(value, names[index], rank, tp).clone()
                          if torch.is_tensor(value) and value.dim() > 0 else value)
                    for key, value in state.items()}
            for index, state in full["state"].items()
        }
        out.append(shard)
    return out
