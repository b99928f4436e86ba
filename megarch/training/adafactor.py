"""Adafactor, exact under tensor parallelism.

:class:`Adafactor` is the algorithm of ``torch.optim.Adafactor`` (torch's single-tensor loop,
its default): the same hyper-parameters, order of operations, ``eps`` handling, ``beta2`` decay
``1 - t^decay``, relative step ``min(lr, 1 / sqrt(t)) * max(eps2, RMS(param))``, decoupled
weight decay ``lr * weight_decay``, update clipping by ``max(1, RMS(update) / d)`` and the same
state (``step``; ``row_var`` [..., rows, 1] and ``col_var`` [..., 1, cols] for tensors of two or
more dims, factored over the last two; ``variance`` for vectors), so state dicts move between
the two in both directions. Without tensor parallelism it is bitwise torch's update.

What tensor parallelism adds. A TP rank holds a shard of some parameters (split dim by name:
:func:`megarch.parallel.tensor_parallel.partition_dims`). torch's Adafactor would compute its
statistics on the shard; here every statistic that spans the split dim is summed over the TP
group, so each rank's update is the slice of the single-process update:

====================================  ======================================================
shard                                 reduced over the TP group
====================================  ======================================================
split along the rows (dim -2)         column means of grad^2; the mean of ``row_var`` that
                                      normalises the factored estimate
split along the columns (dim -1)      row means of grad^2
any shard (matrix, vector, other dim) sum of squares of the parameter (RMS for the step
                                      size) and of the update (RMS for clipping)
====================================  ======================================================

Factor states then follow the checkpoint resharding rule: ``row_var`` is split along dim 0
with its dim-0 sharded parameter and replicated (identical on every TP rank) otherwise;
``col_var`` is split along its last dim with its dim-1 sharded parameter, else replicated;
``variance`` is split like its vector parameter. Replicated parameters need no communication.

Communication per step (when some parameter is sharded and the TP group has more than one
rank): one all-reduce per dtype of the concatenated partial statistics and parameter sums of
squares (float64 scalars: one more), then one all-reduce of the update sums of squares. The
update of a sharded parameter is recomputed after that second reduction instead of kept, so
peak memory stays one update at a time, as torch's loop. Unsharded runs do not communicate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from megarch.parallel.collectives import Group, all_reduce_tensors, group_size


@dataclass(frozen=True)
class TensorParallelLayout:
    """Which parameters are tensor-parallel shards, and the group holding the other shards.

    Every TP rank passes its own parameters in the same order (same model structure); the
    shards along a dim have equal sizes, so the full size is ``tp`` times the local one.
    """

    group: Group
    """The tensor-parallel process group (None or one rank: nothing is sharded)."""
    split_dims: Mapping[Tensor, int]
    """Split dim of each sharded parameter (keyed by the parameter); absent: replicated."""


@dataclass
class _ParamStep:
    """One parameter's step between the local work and the reductions."""

    param: Tensor
    grad: Tensor
    state: dict
    split: int | None  # the split dim (non-negative) when sharded over more than one rank
    lr: float | Tensor
    weight_decay: float
    d: float
    eps1: float
    eps2: float
    rho: float | Tensor
    one_minus_beta2: float
    sums: list[Tensor]  # partial statistics, summed over the TP group in place
    alpha: float | Tensor = 0.0
    row_norm: Tensor | None = None  # the clamped mean of row_var (factored)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Adafactor(torch.optim.Optimizer):
    """``torch.optim.Adafactor``'s algorithm and state, with statistics reduced over the TP
    group for sharded parameters (module docstring).

    Args are torch's (``foreach`` is accepted and stored for state-dict compatibility; the
    update is always torch's default per-tensor loop), plus ``tp_layout``: the sharded
    parameters and their TP group (None: the class's :attr:`tp_layout`, by default none).
    """

    tp_layout: TensorParallelLayout | None = None
    """Default layout of instances; set on the classes :meth:`with_layout` returns."""

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        tp_layout: TensorParallelLayout | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Adafactor: a tensor lr must have one element")
        checks = [(0.0 <= lr, f"lr should be >= 0, not {lr}"),
                  (beta2_decay <= 0.0, f"beta2_decay should be <= 0, not {beta2_decay}"),
                  (eps[0] is None or eps[0] >= 0.0, f"eps[0] should be >= 0, not {eps[0]}"),
                  (eps[1] >= 0.0, f"eps[1] should be >= 0, not {eps[1]}"),
                  (d >= 1.0, f"the clipping threshold d should be >= 1, not {d}"),
                  (weight_decay >= 0.0, f"weight_decay should be >= 0, not {weight_decay}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Adafactor: {message}")
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                    "weight_decay": weight_decay, "foreach": foreach, "maximize": maximize}
        super().__init__(params, defaults)
        if tp_layout is not None:
            self.tp_layout = tp_layout
        self._check_layout()

    @classmethod
    def with_layout(cls, layout: TensorParallelLayout) -> type[Adafactor]:
        """A subclass whose instances default to ``layout``. Wrappers that rebuild the
        optimizer from its class and hyper-parameters (ZeRO-1:
        :func:`megarch.parallel.data_parallel.zero1`) then keep the layout, which no parameter
        group carries: a process group cannot go into a state dict."""
        return type(cls.__name__, (cls,), {"tp_layout": layout, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})

    def _check_layout(self) -> None:
        if self.tp_layout is None:
            return
        for group in self.param_groups:
            for param in group["params"]:
                dim = self.tp_layout.split_dims.get(param)
                if dim is not None and not -param.dim() <= dim < param.dim():
                    raise ValueError(f"Adafactor: tp_layout splits a parameter of shape "
                                     f"{tuple(param.shape)} along dim {dim}, which it lacks")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            for param in group["params"]:
                p_state = self.state.get(param, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]),
                                                   dtype=_scalar_dtype())

    def _tp_size(self) -> int:
        return 1 if self.tp_layout is None else group_size(self.tp_layout.group)

    def _split_of(self, param: Tensor) -> int | None:
        if self._tp_size() == 1:
            return None
        dim = self.tp_layout.split_dims.get(param)
        return None if dim is None else dim % param.dim()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tp = self._tp_size()
        # unsharded parameters are updated here; sharded ones wait with their partial sums
        pending = [item for group in self.param_groups for item in self._start_group(group)]
        if not pending:  # the same on every TP rank (same parameters): no collective at all
            return loss
        all_reduce_tensors([t for item in pending for t in item.sums], self.tp_layout.group)
        for item in pending:
            self._second_moments(item, tp)
        for item in pending:  # the update's sum of squares, for the clipping RMS
            item.sums = [_update(item).norm(2).double().square().reshape(1)]
        all_reduce_tensors([item.sums[0] for item in pending], self.tp_layout.group)
        for item in pending:  # decay, then the recomputed update (torch's order of effects)
            numel = item.param.numel() * tp
            denom = max(1.0, math.sqrt(item.sums[0].item()) / ((numel**0.5) * item.d))
            if item.weight_decay != 0:
                item.param.mul_(1 - item.lr * item.weight_decay)
            item.param.add_(_update(item), alpha=-item.alpha / denom)
        return loss

    def _start_group(self, group: dict) -> list[_ParamStep]:
        """Update the unsharded parameters of ``group`` (torch's loop) and start the sharded
        ones: their partial statistics, to be reduced."""
        eps1, eps2 = group["eps"]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        pending = []
        for param in group["params"]:
            if param.grad is None:
                continue
            if torch.is_complex(param):
                raise RuntimeError("Adafactor does not support complex parameters")
            if param.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            if eps1 is None:  # as torch: the first parameter's dtype sets it for the group
                eps1 = torch.finfo(param.dtype).eps
            state = self.state[param]
            if not state:
                _init_state(state, param.grad)
            state["step"] += 1
            step = state["step"].item()
            item = _ParamStep(
                param=param, grad=-param.grad if group["maximize"] else param.grad,
                state=state, split=self._split_of(param), lr=lr,
                weight_decay=group["weight_decay"], d=group["d"], eps1=eps1, eps2=eps2,
                rho=min(lr, 1 / (step**0.5)), one_minus_beta2=step ** group["beta2_decay"],
                sums=[])
            if item.split is None:
                _local_step(item)
            else:
                _partial_sums(item)
                pending.append(item)
        return pending

    def _second_moments(self, item: _ParamStep, tp: int) -> None:
        """Finish a sharded parameter's moments from the reduced sums; set its step size."""
        param_sq, *stats = item.sums
        rms = math.sqrt(param_sq.item()) / ((item.param.numel() * tp) ** 0.5)
        item.alpha = max(item.eps2, rms) * item.rho
        grad, state, omb = item.grad, item.state, item.one_minus_beta2
        if grad.dim() == 1 or item.split < grad.dim() - 2:
            _moments(item, grad, state, omb)
            return
        if item.split == grad.dim() - 2:  # rows split: column means and the row_var mean
            col_sq, row_var_sum = stats
            state["col_var"].lerp_(col_sq.div_(grad.size(-2) * tp), omb)
            item.row_norm = row_var_sum.div_(grad.size(-2) * tp).clamp_(min=item.eps1)
        else:  # columns split: the row means
            (row_sq,) = stats
            state["row_var"].lerp_(row_sq.div_(grad.size(-1) * tp), omb)
            state["col_var"].lerp_(_col_mean(grad), omb)
            item.row_norm = state["row_var"].mean(dim=-2, keepdim=True).clamp_(min=item.eps1)


def _init_state(state: dict, grad: Tensor) -> None:
    """torch's initial state: ``step`` 0 (a CPU scalar), zero factors or zero variance."""
    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
    if grad.dim() > 1:
        state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
        state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
    else:
        state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)


def _row_mean(grad: Tensor) -> Tensor:
    """(grad^2).mean(-1) as torch computes it (no grad-sized temporary)."""
    return torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))


def _col_mean(grad: Tensor) -> Tensor:
    """(grad^2).mean(-2) as torch computes it."""
    return torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))


def _moments(item: _ParamStep, grad: Tensor, state: dict, omb: float) -> None:
    """Second moments needing no reduction (torch's order), and the factored normaliser."""
    if grad.dim() > 1:
        state["row_var"].lerp_(_row_mean(grad), omb)
        state["col_var"].lerp_(_col_mean(grad), omb)
        item.row_norm = state["row_var"].mean(dim=-2, keepdim=True).clamp_(min=item.eps1)
    else:
        state["variance"].lerp_(grad * grad, omb)


def _update(item: _ParamStep) -> Tensor:
    """The unclipped update grad / sqrt(V) from the current moments (a new tensor)."""
    state = item.state
    if item.grad.dim() > 1:
        estimate = state["row_var"] @ state["col_var"]
        estimate.div_(item.row_norm)
    else:
        estimate = state["variance"].clone()  # not written into
    # eps1 squared: the square root brings it back to eps1's magnitude
    return estimate.clamp_(min=item.eps1 * item.eps1).rsqrt_().mul_(item.grad)


def _local_step(item: _ParamStep) -> None:
    """torch's update of a parameter that is not sharded (no communication)."""
    param = item.param
    alpha = max(item.eps2, param.norm(2).item() / (param.numel() ** 0.5)) * item.rho
    if item.weight_decay != 0:
        param.mul_(1 - item.lr * item.weight_decay)
    _moments(item, item.grad, item.state, item.one_minus_beta2)
    update = _update(item)
    denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * item.d))
    param.add_(update, alpha=-alpha / denom)


def _partial_sums(item: _ParamStep) -> None:
    """A sharded parameter's local sums to reduce: its sum of squares, and the grad^2 sums
    (and the row_var sum) over the split dim when that dim is factored."""
    grad, state = item.grad, item.state
    item.sums = [item.param.norm(2).double().square().reshape(1)]
    if grad.dim() == 1 or item.split < grad.dim() - 2:
        return
    if item.split == grad.dim() - 2:  # rows split: row means are local
        state["row_var"].lerp_(_row_mean(grad), item.one_minus_beta2)
        item.sums += [torch.norm(grad, dim=-2, keepdim=True).square_(),
                      state["row_var"].sum(dim=-2, keepdim=True)]
    else:  # columns split
        item.sums.append(torch.norm(grad, dim=-1, keepdim=True).square_())
