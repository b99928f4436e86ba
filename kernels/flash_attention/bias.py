"""The T5 relative position bias in kernel form: a per-head bias by clamped distance.

The launcher turns the learned table [num_buckets, heads] into ``[heads, 2 R + 1]`` by
distance (exact because T5 buckets saturate beyond ``max_distance``); the kernels gather from
it with ``_distance_index``, and its gradient flows back to the table through autograd indexing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import relative_position_bucket


@triton.jit
def _distance_index(q_pos, k_pos, BIAS_RANGE: tl.constexpr):
    """Index into a [2 R + 1] bias-by-distance row of ``k_pos - q_pos`` clamped to [-R, R]."""
    rel = k_pos[None, :] - q_pos[:, None]
    rel = tl.minimum(tl.maximum(rel, -BIAS_RANGE), BIAS_RANGE)
    return rel + BIAS_RANGE



def bias_range(num_buckets: int, max_distance: int) -> int:
    """R such that T5 buckets of every distance beyond +-R equal those of +-R (saturation)."""
    return max(max_distance, num_buckets)


def bias_by_distance(table: torch.Tensor, bidirectional: bool, max_distance: int) -> torch.Tensor:
    """The per-head bias of each clamped distance ``k_pos - q_pos`` in [-R, R]: [heads, 2 R + 1].

    Differentiable in ``table`` [num_buckets, heads] (float32 result).
    """
    num_buckets = table.shape[0]
    r = bias_range(num_buckets, max_distance)
    distance = torch.arange(-r, r + 1, device=table.device)
    buckets = relative_position_bucket(distance, bidirectional, num_buckets, max_distance)
    return table.float()[buckets].t().contiguous()  # [heads, 2 R + 1]

