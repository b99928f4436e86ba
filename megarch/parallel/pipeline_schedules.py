"""Pipeline schedules over explicit point-to-point transfers: 1F1B, interleaved 1F1B and
forward only, for the stages the model builds (megarch.model.stages; a one-stage pipeline is
the whole model, so these also run the single-process step).

A schedule is, for every pipeline rank, an ordered list of operations (:class:`Op`): the
forward or the backward pass of one micro-batch through one of the rank's model chunks.

- 1F1B (PipeDream-Flush, :func:`one_f_one_b_order`): ``pp - rank - 1`` warm-up forwards, then
  one forward / one backward, then the remaining backwards.
- Interleaved 1F1B (Megatron's virtual pipeline, :func:`interleaved_order`): forwards walk the
  chunks ``0 .. v-1`` in groups of ``pp`` micro-batches, backwards walk them ``v-1 .. 0``;
  ``2 (pp - rank - 1) + (v - 1) pp`` warm-up forwards (all of them when there are ``pp``
  micro-batches), then 1F1B, then the remaining backwards. The micro-batch count must be a
  multiple of ``pp``.
- Forward only (evaluation): micro-batch by micro-batch, chunk by chunk.

Transfers are deadlock-free by construction, on gloo as on NCCL: every rank derives the same
*timetable* from all ranks' orders (:func:`timetable`: a rank runs its operations in order, each
in the first time slot after the one that produced its input). A tensor produced in slot ``s``
is sent and received at the boundary after slot ``s``, where each rank posts all its sends and
receives of that boundary together (one ``batch_isend_irecv``, as Megatron's
``send_forward_recv_backward``) and waits for them. By induction on ``s`` every rank gets past
every boundary: the inputs of slot ``s`` arrived at earlier boundaries, and both ends of each
transfer of boundary ``s`` post it there.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

Stage = nn.Module
"""A pipeline stage: a model module with ``ctx``, ``layout``, ``virtual_stages``,
``run_stage(batch, inputs, chunk)``, ``input_shapes(virtual, batch)`` and
``reduce_tied_embedding_grads()`` (megarch.model's DecoderLM / EncoderDecoderLM)."""


class Op(NamedTuple):
    """One operation of a rank: the forward or backward pass of a micro-batch through one of
    the rank's model chunks (virtual stage ``chunk * pp + rank``)."""

    backward: bool
    micro: int
    chunk: int


def one_f_one_b_order(pp: int, rank: int, n_micro: int) -> list[Op]:
    """Rank ``rank``'s operations under 1F1B (one model chunk per rank)."""
    warmup = min(pp - rank - 1, n_micro)
    ops = [Op(False, m, 0) for m in range(warmup)]
    for i in range(n_micro - warmup):
        ops += [Op(False, warmup + i, 0), Op(True, i, 0)]
    return ops + [Op(True, m, 0) for m in range(n_micro - warmup, n_micro)]


def interleaved_order(pp: int, virtual: int, rank: int, n_micro: int) -> list[Op]:
    """Rank ``rank``'s operations under interleaved 1F1B with ``virtual`` chunks per rank."""
    if n_micro % pp:
        raise ValueError(f"interleaved 1F1B needs a multiple of pp={pp} micro-batches per step, "
                         f"got {n_micro}: change run.global_batch or run.micro_batch")
    total = n_micro * virtual

    def op(k: int, backward: bool) -> Op:
        group, within = divmod(k, pp * virtual)
        chunk = within // pp
        return Op(backward, group * pp + within % pp, virtual - 1 - chunk if backward else chunk)

    warmup = total if n_micro == pp else min(2 * (pp - rank - 1) + (virtual - 1) * pp, total)
    ops = [op(k, False) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [op(warmup + i, False), op(i, True)]
    return ops + [op(k, True) for k in range(total - warmup, total)]


def forward_order(pp: int, virtual: int, rank: int, n_micro: int) -> list[Op]:
    """Rank ``rank``'s forward passes for evaluation: micro-batch by micro-batch."""
    return [Op(False, m, c) for m in range(n_micro) for c in range(virtual)]


def _dependency(op: Op, virtual: int, n_virtual: int) -> tuple[bool, int, int] | None:
    """(backward, micro, virtual stage) of the operation producing ``op``'s input."""
    if not op.backward:
        return None if virtual == 0 else (False, op.micro, virtual - 1)
    if virtual == n_virtual - 1:
        return (False, op.micro, virtual)  # the loss of its own forward
    return (True, op.micro, virtual + 1)


def timetable(orders: list[list[Op]], virtual: int) -> list[list[int]]:
    """The slot of each operation of each rank (``orders[rank]``, ``pp = len(orders)``): in
    order, one per slot, each after the slot producing its input. Raises RuntimeError when the
    orders deadlock (an operation waits on one that can only come after it)."""
    pp = len(orders)
    n_virtual = pp * virtual
    done: dict[tuple[bool, int, int], int] = {}
    slots: list[list[int]] = [[] for _ in orders]
    slot = 0
    while any(len(slots[r]) < len(orders[r]) for r in range(pp)):
        ran = False
        for rank, order in enumerate(orders):
            if len(slots[rank]) == len(order):
                continue
            op = order[len(slots[rank])]
            k = op.chunk * pp + rank
            dep = _dependency(op, k, n_virtual)
            if dep is None or done.get(dep, slot) < slot:
                done[(op.backward, op.micro, k)] = slot
                slots[rank].append(slot)
                ran = True
        if not ran:
            heads = {r: orders[r][len(slots[r])] for r in range(pp)
                     if len(slots[r]) < len(orders[r])}
            raise RuntimeError(f"pipeline schedule deadlocks at slot {slot}: waiting {heads}")
        slot += 1
    return slots


class _Plan(NamedTuple):
    """One rank's part of a timetable."""

    ops: dict[int, Op]
    """Slot -> this rank's operation."""
    sends: dict[int, tuple[int, tuple[bool, int, int]]]
    """Slot -> (destination rank, key) of what this rank sends after it."""
    recvs: dict[int, list[tuple[int, tuple[bool, int, int]]]]
    """Slot -> [(source rank, key)] of what this rank receives after it; a key is
    (backward, micro, virtual stage) of the operation that consumes the tensors."""
    last: int
    """The last slot in which this rank does anything."""


@functools.lru_cache(maxsize=64)
def _plan(kind: str, pp: int, virtual: int, n_micro: int, rank: int) -> _Plan:
    make = {"1f1b": lambda r: one_f_one_b_order(pp, r, n_micro),
            "interleaved": lambda r: interleaved_order(pp, virtual, r, n_micro),
            "forward": lambda r: forward_order(pp, virtual, r, n_micro)}[kind]
    orders = [make(r) for r in range(pp)]
    slots = timetable(orders, virtual)
    n_virtual = pp * virtual
    sends, recvs = {}, defaultdict(list)
    for src, (order, times) in enumerate(zip(orders, slots, strict=True)):
        for op, slot in zip(order, times, strict=True):
            k = op.chunk * pp + src
            if not op.backward and k < n_virtual - 1:
                dst, key = (k + 1) % pp, (False, op.micro, k + 1)
            elif op.backward and k > 0:
                dst, key = (k - 1) % pp, (True, op.micro, k - 1)
            else:
                continue
            if src == rank:
                sends[slot] = (dst, key)
            if dst == rank:
                recvs[slot].append((src, key))
    ops = dict(zip(slots[rank], orders[rank], strict=True))
    last = max([*ops, *sends, *recvs], default=-1)
    return _Plan(ops, sends, dict(recvs), last)


def _p2p(ops: list[tuple[str, torch.Tensor, int, int]]) -> None:
    """Post sends and receives (kind, tensor, peer, tag) together and wait for all of them."""
    if not ops:
        return
    p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, peer, tag=tag)
           for kind, tensor, peer, tag in ops]
    for work in dist.batch_isend_irecv(p2p):
        work.wait()


LossFn = Callable[[torch.Tensor, dict], dict]


def _run(stage: Stage, micro_batches: list[dict], loss_fn: LossFn, kind: str, train: bool,
         autocast_dtype: torch.dtype | None) -> list[dict]:
    """Run ``kind``'s timetable on this rank (see the module docstring)."""
    ctx, layout = stage.ctx, stage.layout
    plan = _plan(kind, ctx.pp, layout.virtual_stages, len(micro_batches), ctx.pp_rank)
    device = next(stage.parameters()).device

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)
    received: dict[tuple[bool, int, int], list[torch.Tensor]] = {}
    saved: dict[tuple[int, int], tuple] = {}
    results: dict[int, dict] = {}

    def forward(op: Op) -> list[torch.Tensor] | None:
        k, batch = layout.virtual(ctx.pp_rank, op.chunk), micro_batches[op.micro]
        inputs = tuple(received.pop((False, op.micro, k), ()))
        if train:
            inputs = tuple(x.requires_grad_() for x in inputs)
        with autocast():  # the forward only (the loss and the backward outside)
            out = stage.run_stage(batch, inputs, op.chunk)
        if k == layout.n_virtual - 1:
            results[op.micro] = loss_fn(out, batch)
            out, outgoing = (results[op.micro]["loss"],), None
        else:
            outgoing = [t.detach().contiguous() for t in out]
        if train:
            saved[(op.micro, k)] = (inputs, out)
        return outgoing

    def backward(op: Op) -> list[torch.Tensor] | None:
        k = layout.virtual(ctx.pp_rank, op.chunk)
        inputs, out = saved.pop((op.micro, k))
        torch.autograd.backward(list(out), received.pop((True, op.micro, k), None))
        if k == 0:
            return None
        return [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs]

    for slot in range(plan.last + 1):
        outgoing = None
        op = plan.ops.get(slot)
        if op is not None:
            outgoing = backward(op) if op.backward else forward(op)
        transfers = []
        if slot in plan.sends:
            peer = ctx.stage_rank(plan.sends[slot][0])
            transfers += [("send", t, peer, tag) for tag, t in enumerate(outgoing)]
        for src, key in plan.recvs.get(slot, ()):
            backward_key, micro, k = key
            shapes = stage.input_shapes(k + 1 if backward_key else k, micro_batches[micro])
            received[key] = [torch.empty(shape, device=device) for shape in shapes]
            peer = ctx.stage_rank(src)
            transfers += [("recv", t, peer, tag) for tag, t in enumerate(received[key])]
        _p2p(transfers)
    if train:
        stage.reduce_tied_embedding_grads()
    return [results[m] for m in sorted(results)]


def one_f_one_b(stage: Stage, micro_batches: list[dict], loss_fn: LossFn,
                autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Forward and backward ``micro_batches`` through the pipeline in 1F1B order (one model
    chunk per rank). Every rank of the pipeline calls it with the same micro-batches.

    ``loss_fn(logits, batch)`` (last stage) returns a dict with a scalar ``loss`` to
    back-propagate (normalise it over all micro-batches yourself). Gradients accumulate in the
    stage's parameters, embedding gradients summed over the ranks holding a copy. Returns the
    ``loss_fn`` results in micro-batch order on the last stage, [] elsewhere. With
    ``autocast_dtype`` (e.g. bfloat16) the stages' forward passes run under autocast (the
    hidden states that travel stay float32, as the residual stream).
    """
    if stage.virtual_stages != 1:
        raise ValueError(f"one_f_one_b runs one model chunk per rank, the stage has "
                         f"{stage.virtual_stages}: use interleaved_one_f_one_b")
    return _run(stage, micro_batches, loss_fn, "1f1b", True, autocast_dtype)


def interleaved_one_f_one_b(stage: Stage, micro_batches: list[dict], loss_fn: LossFn,
                            autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """As :func:`one_f_one_b`, in interleaved 1F1B order over the stage's model chunks; the
    number of micro-batches must be a multiple of ``pp``."""
    return _run(stage, micro_batches, loss_fn, "interleaved", True, autocast_dtype)


@torch.no_grad()
def forward_only(stage: Stage, micro_batches: list[dict], loss_fn: LossFn,
                 autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Forward ``micro_batches`` through the pipeline without gradients (evaluation); returns
    the ``loss_fn(logits, batch)`` results on the last stage, [] elsewhere."""
    return _run(stage, micro_batches, loss_fn, "forward", False, autocast_dtype)
