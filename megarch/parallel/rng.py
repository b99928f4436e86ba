"""Dropout random streams under tensor parallelism.

Within a tensor-parallel group every rank holds the same *replicated* activations (the
residual stream without sequence parallelism) and must drop the same units there, or the
replicas diverge; but where the activations are *split* across the ranks (attention
probabilities: the heads; the feed-forward hidden units: ``d_ff``; with sequence parallelism
the residual stream: the sequence), each rank holds different units and must draw its own
masks, or the masks of the shards are copies of one another (correlated dropout).

- Replicated activations use the global torch generator, which every rank of a TP group
  seeds alike (:func:`dropout_seed`) and advances alike: identical masks on the TP ranks.
- Split activations use :func:`split_dropout`: it draws one 63-bit value from the global CPU
  generator (the same value on every TP rank), mixes in the TP rank, and seeds a generator on
  the activation's device with the result. The masks differ per TP rank (and per DP rank,
  whose global streams differ) and are reproducible from the run seed.

Why derive rather than keep a second advancing generator (Megatron's RNG tracker): activation
checkpointing (``torch.utils.checkpoint``, non-reentrant) restores the global CPU and device
generators before recomputing a block, which rewinds the derived seeds with them, so the
recomputed forward draws the masks of the first one; a separate generator would have moved on.
The CPU draw needs no device synchronisation, so CUDA pays no host sync per call.

Without a TP group (or a group of one) everything is plain ``F.dropout`` on the global
stream, so a single-process model draws exactly what ``nn.Dropout`` draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megarch.parallel.collectives import Group, group_rank, group_size
from megarch.parallel.context import ParallelContext

_MASK64 = (1 << 64) - 1
_STREAM_SEED_OFFSET = 1_000_003
"""The global seeds of two data-parallel streams differ by this (kept from earlier runs)."""


def rank_seed(base: int, rank: int) -> int:
    """A seed in [0, 2**63) for ``rank``'s stream derived from ``base`` (SplitMix64's
    finaliser: every bit of the result depends on both, including the low 32 bits a CPU
    generator keeps)."""
    z = (base + (rank + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def global_draw() -> int:
    """One 63-bit value from the global CPU generator: no device synchronisation, reproducible
    from the run seed, and rewound with the generator by activation checkpointing (the base
    that per-rank seeds are derived from, :func:`rank_seed`)."""
    return int(torch.randint(1 << 62, ()).item())


def split_dropout(x: torch.Tensor, p: float, group: Group, training: bool = True
                  ) -> torch.Tensor:
    """Dropout of ``x``, activations split across ``group``'s ranks: each rank draws its own
    mask (module docstring). With no group, or a group of one, it is ``F.dropout``."""
    if group_size(group) == 1:
        return F.dropout(x, p, training)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p}: must be in [0, 1) (model.dropout)")
    if not training or p == 0.0:
        return x
    generator = torch.Generator(device=x.device)
    generator.manual_seed(rank_seed(global_draw(), group_rank(group)))
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p, generator=generator)
    return x * keep * (1.0 / (1.0 - p))  # the backward keeps the bool mask only


class TensorParallelDropout(nn.Module):
    """``nn.Dropout`` that knows whether its activations are split across the TP ranks.

    ``split=True``: split by construction (attention probabilities, feed-forward hidden units).
    :attr:`sequence_parallel` is set by the model (``mark_sequence_parallel``) when the
    activations are this rank's sequence chunk. Split activations under a TP group of more
    than one rank go through :func:`split_dropout`; all others through ``F.dropout``.
    """

    sequence_parallel = False
    """Under TP: the activations are this rank's sequence chunk (set by the model)."""

    def __init__(self, p: float = 0.0, tp_group: Group = None, split: bool = False):
        super().__init__()
        self.p = p
        self.tp_group = tp_group
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split or self.sequence_parallel:
            return split_dropout(x, self.p, self.tp_group, self.training)
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, split={self.split or self.sequence_parallel}"


def dropout_seed(seed: int, ctx: ParallelContext) -> int:
    """The global torch seed after a parallel model is built: one stream per data-parallel
    rank and pipeline stage, shared by the ranks of a TP group (replicated masks agree there,
    and :func:`split_dropout` separates the TP ranks itself)."""
    stream = ctx.pp_rank * ctx.dp + ctx.dp_rank
    return seed + _STREAM_SEED_OFFSET * stream
