"""Pipeline parallelism: the stages' embedding group and the schedules that run the stages.

The stages are the model's own modules (megarch.model.stages: ``build_stage`` cuts this rank's
blocks out of the model, a one-stage pipeline is the whole model); this package only moves
tensors between them: the schedules (:mod:`megarch.parallel.pipeline_schedules`: 1F1B,
interleaved 1F1B, forward only) run a stage's ``run_stage`` per micro-batch and model chunk
over explicit point-to-point transfers, and :func:`embedding_group` is the group over which the
embedding copies (first stage, first decoder stage, tied output) sum their gradients.
"""

from __future__ import annotations

import torch.distributed as dist

from megarch.parallel.context import ParallelContext
from megarch.parallel.pipeline_schedules import (
    forward_only,
    interleaved_one_f_one_b,
    one_f_one_b,
)


def embedding_group(ctx: ParallelContext, ranks: list[int]) -> dist.ProcessGroup | None:
    """Create the embedding group of every pipeline (collective: every rank calls it) over the
    pipeline ranks ``ranks`` holding a copy, and return this rank's (None for one copy)."""
    if len(ranks) < 2:
        return None
    mine = None
    size = ctx.tp * ctx.dp
    for position in range(size):  # the (dp, tp) position of one pipeline
        members = [r * size + position for r in ranks]
        group = ctx.new_group(members)
        if ctx.rank in members:
            mine = group
    return mine


__all__ = ["embedding_group", "forward_only", "interleaved_one_f_one_b", "one_f_one_b"]
