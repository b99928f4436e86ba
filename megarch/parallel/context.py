"""The parallel context: tensor / pipeline / data-parallel sizes, ranks and process groups.

One :class:`ParallelContext` is built per process and passed explicitly to whatever needs it
(model construction, the loss, the training loop); nothing reads parallel state from module
globals. :meth:`ParallelContext.single` is the default: one process, no ``torch.distributed``.

Rank layout (Megatron's default order, TP fastest, then DP, then PP)::

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the TP group of a rank is a run of ``tp`` consecutive ranks (on one node when
``tp <= GPUS_PER_NODE``), which is where the per-layer all-reduces must be cheapest.

Why ``torch.distributed.new_group`` rather than megatron-core's
``parallel_state.initialize_model_parallel``: both give the same groups for TP x DP x PP
(measured), but megatron-core keeps them in module globals (the opposite of a passed context),
costs seconds of import per process and four warnings, and is absent from the GPU machines we
check on. Building the three families of groups ourselves is ~20 lines and has no globals.

Every group is made by :meth:`ParallelContext.new_group`, which passes ``parallel.timeout_s``
explicitly: ``torch.distributed.new_group`` does *not* inherit the default group's timeout (it
falls back to the backend default, 30 minutes on gloo; measured: a TP2 job with one rank
SIGSTOPped and ``--parallel.timeout_s 10`` still hung 60 s later). Collectives time out; a peer
that is stopped or hung outside any collective is caught by :mod:`megarch.parallel.watchdog`,
which ends the job naming the rank that stopped answering.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""Collective timeout: a rank waiting longer than this on a dead peer raises instead of hanging."""


@dataclass
class ParallelContext:
    """Sizes, this process's ranks and the process groups of one TP x DP x PP layout.

    The groups are None in a single process; helpers in :mod:`megarch.parallel.collectives`
    treat a None group (or a group of one) as "no communication".
    """

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    rank: int = 0
    """Global rank."""
    sequence_parallel: bool = False
    """Under TP: the residual stream, norms and dropout hold this rank's chunk of the sequence
    (Megatron-SP; megarch.parallel.collectives)."""
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """The ranks sharing this rank's layers' shards."""
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """The ranks holding the same shards of different data (gradient all-reduce)."""
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """The ranks holding the stages of one pipeline."""
    world_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """Every rank (for run-wide decisions such as stopping on a signal)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Collective timeout of every group this context makes (``parallel.timeout_s``)."""
    watchdog: object | None = field(default=None, repr=False)
    """The peer watchdog of this process (megarch.parallel.watchdog), when one runs."""

    @property
    def world_size(self) -> int:
        """tp * dp * pp."""
        return self.tp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        """Rank within the tensor-parallel group."""
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        """Rank within the data-parallel group."""
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        """Pipeline stage of this rank."""
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        """True on the pipeline stage that embeds the tokens."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the pipeline stage that computes the logits and the loss."""
        return self.pp_rank == self.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of pipeline stage ``pp_rank`` holding this rank's TP and DP position."""
        return pp_rank * self.tp * self.dp + self.dp_rank * self.tp + self.tp_rank

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (writes logs, tensorboard, replicated checkpoint state)."""
        return self.rank == 0

    def new_group(self, ranks: list[int]) -> dist.ProcessGroup:
        """A process group of ``ranks`` with this context's collective timeout (a collective
        call on every rank). The only place megarch creates groups: a group made elsewhere
        with a bare ``dist.new_group`` would wait 30 minutes on a dead peer."""
        return dist.new_group(ranks, timeout=datetime.timedelta(seconds=self.timeout_s))

    def barrier(self) -> None:
        """Wait for every rank (nothing in a single process)."""
        if self.world_group is not None:
            dist.barrier(group=self.world_group)

    @classmethod
    def single(cls) -> ParallelContext:
        """One process, no ``torch.distributed``."""
        return cls()

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: int | None = None,
              sequence_parallel: bool = False,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
        """The context of this process in an initialised default process group.

        ``dp`` defaults to ``world_size // (tp * pp)``. Every rank must call this with the same
        sizes (``new_group`` is collective). Every group waits at most ``timeout_s`` on a peer.
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        if dp is None or dp == 0:
            dp = world // (tp * pp)
        if tp * pp * dp != world:
            raise ValueError(
                f"tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp} processes, but the job has "
                f"{world}: launch tp*pp*dp processes or change the sizes"
            )
        ctx = cls(tp=tp, pp=pp, dp=dp, rank=rank, world_group=dist.group.WORLD,
                  sequence_parallel=sequence_parallel and tp > 1, timeout_s=timeout_s)
        ctx.tp_group = ctx._my_group(_tp_groups(tp, dp, pp))
        ctx.dp_group = ctx._my_group(_dp_groups(tp, dp, pp))
        ctx.pp_group = ctx._my_group(_pp_groups(tp, dp, pp))
        log.info("rank %d: tp %d/%d, dp %d/%d, pp %d/%d", rank, ctx.tp_rank, tp, ctx.dp_rank, dp,
                 ctx.pp_rank, pp)
        return ctx

    def _my_group(self, groups: list[list[int]]) -> dist.ProcessGroup:
        """Create every group (a collective call on all ranks); return the one holding us."""
        mine = None
        for ranks in groups:
            group = self.new_group(ranks)
            if self.rank in ranks:
                mine = group
        assert mine is not None
        return mine


def _tp_groups(tp: int, dp: int, pp: int) -> list[list[int]]:
    return [list(range(start, start + tp)) for start in range(0, tp * dp * pp, tp)]


def _dp_groups(tp: int, dp: int, pp: int) -> list[list[int]]:
    return [[p * tp * dp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]


def _pp_groups(tp: int, dp: int, pp: int) -> list[list[int]]:
    return [[p * tp * dp + d * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)]



def init_distributed(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> bool:
    """Initialise the default process group from torchrun's environment, if there is one.

    Returns False (and does nothing) in a plain single process (no ``WORLD_SIZE`` or 1).
    The backend defaults to NCCL when CUDA is available and gloo otherwise.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d: process group up (%s)", dist.get_rank(), dist.get_world_size(),
             backend)
    return True
