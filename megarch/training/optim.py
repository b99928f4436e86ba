"""Optimizers and learning-rate schedules.

The schedule is a pure function of the optimizer step (:func:`lr_at`): the loop sets each
group's ``lr`` before every update, so a checkpoint needs only the step to restore it.
Steps are counted from 1 (the first update is step 1), as Adafactor's own counter.

- ``constant``: ``lr`` (after the warm-up).
- ``inverse_sqrt``: ``lr * sqrt(warmup / step)`` after the warm-up (``lr / sqrt(step)`` with
  none): T5's ``1 / sqrt(max(step, warmup))`` when ``lr = 1 / sqrt(warmup)``, with a ramp.
- ``cosine``: from ``lr`` at the end of the warm-up to ``lr * min_lr_ratio`` at
  ``decay_steps``, then flat.
- warm-up (all): ``lr * step / warmup_steps`` for ``step <= warmup_steps``.

Adafactor (:class:`megarch.training.adafactor.Adafactor`: ``torch.optim.Adafactor``'s algorithm
and state, exact under tensor parallelism) scales each update by
``rho_t * max(eps2, RMS(param))`` with ``rho_t = min(lr, 1 / sqrt(t))``: with the constant
schedule and ``lr = 0.01`` this is the study's ``1 / sqrt(max(step, 10^4))`` (PAPER.md) with no
external schedule at all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megarch.config.train import OptimConfig
from megarch.parallel.collectives import group_size
from megarch.parallel.tensor_parallel import partition_dims
from megarch.training.adafactor import Adafactor, TensorParallelLayout


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate of update ``step`` (1-based) of a ``total_steps``-step run."""
    step = max(step, 1)
    warmup = cfg.warmup_steps
    if warmup and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / step)
    end = cfg.decay_steps or total_steps
    if end <= warmup:
        return cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - warmup) / (end - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, biases or position-bias tables)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "rel_bias" not in name and "table" not in name
        (decay if is_matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def apex_fused_adam() -> type | None:
    """NVIDIA apex's ``FusedAdam`` when that apex is installed, else None (silently).

    Another PyPI package is also called ``apex``: only one exposing
    ``apex.optimizers.FusedAdam`` counts.
    """
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # ImportError, or a foreign "apex" failing in its own way
        return None
    return FusedAdam


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``model``'s trainable parameters.

    AdamW on CUDA uses apex's ``FusedAdam`` (in AdamW mode: the same update) when NVIDIA apex
    is installed, else torch's fused AdamW; on CPU, torch's AdamW.

    Adafactor is megarch's (one parameter group, in ``model.parameters()`` order, as
    ``torch.optim.Adafactor`` had: its checkpoints load). Under tensor parallelism
    (``model.tp_group`` of more than one rank) it knows each parameter's split dim from the
    layers' declarations (:func:`megarch.parallel.tensor_parallel.partition_dims`) and reduces
    its statistics over the group, so the TP run takes the single process's steps.
    """
    if cfg.name == "adamw":
        groups = _decay_groups(model, cfg.weight_decay)
        on_cuda = next(model.parameters()).is_cuda
        fused_adam = apex_fused_adam() if on_cuda else None
        if fused_adam is not None:
            return fused_adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                              adam_w_mode=True)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 fused=True if on_cuda else None)
    if cfg.name == "adafactor":
        adafactor = Adafactor
        tp_group = getattr(model, "tp_group", None)
        if group_size(tp_group) > 1:  # a class bound to the layout: ZeRO-1 rebuilds from it
            dims = partition_dims(model)
            split_dims = {p: dims[name] for name, p in model.named_parameters()
                          if dims[name] is not None}
            adafactor = Adafactor.with_layout(TensorParallelLayout(tp_group, split_dims))
        return adafactor(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
            beta2_decay=cfg.adafactor_decay, eps=(None, cfg.adafactor_scale_eps),
            d=cfg.adafactor_clip, weight_decay=cfg.weight_decay,
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def effective_lr(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The step size the optimizer applies at ``step``: ``lr_at``, and for Adafactor the
    relative step ``min(lr_at, 1 / sqrt(step))`` (multiplied by RMS(param) inside)."""
    lr = lr_at(cfg, step, total_steps)
    if cfg.name == "adafactor":
        return min(lr, 1.0 / math.sqrt(max(step, 1)))
    return lr
