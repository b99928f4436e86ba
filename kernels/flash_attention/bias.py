"""The T5 relative position bias in kernel form: a per-head bias by clamped distance.

The launcher turns the learned table [num_buckets, heads] into ``[heads, 2 R + 1]`` by
distance (exact because T5 buckets saturate beyond ``max_distance``); the kernels gather from
it with ``_distance_index``, and its gradient flows back to the table through autograd indexing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .modes import _LOG2E
from .reference import relative_position_bucket


@triton.jit
def _distance_index(q_pos, k_pos, BIAS_RANGE: tl.constexpr):
    """Index into a [2 R + 1] bias-by-distance row of ``k_pos - q_pos`` clamped to [-R, R]."""
    rel = k_pos[None, :] - q_pos[:, None]
    rel = tl.minimum(tl.maximum(rel, -BIAS_RANGE), BIAS_RANGE)
    return rel + BIAS_RANGE


@triton.jit
def _tile_bias(bias_row, q_pos, k_pos, visible, BIAS_RANGE: tl.constexpr,
               MASKED: tl.constexpr):
    """The tile's [BLOCK_M, BLOCK_N] bias in log2 units and its distance indices; a masked
    tile gathers only its visible elements, a free tile (``visible`` None) every one."""
    idx = _distance_index(q_pos, k_pos, BIAS_RANGE)
    if MASKED:
        bias = tl.load(bias_row + idx, mask=visible, other=0.0)
    else:
        bias = tl.load(bias_row + idx)
    return bias * _LOG2E, idx



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



@triton.jit
def _position_run(pos, offs, valid):
    """(whether ``pos == offs + shift`` for one shift over the valid entries, that shift): the
    positions of a tile's rows or columns are consecutive (no segment boundary inside)."""
    shift = pos - offs
    lo = tl.min(tl.where(valid, shift, 1 << 30), axis=0)
    hi = tl.max(tl.where(valid, shift, -(1 << 30)), axis=0)
    return lo == hi, lo


@triton.jit
def _add_bias_grad(DBIAS_ROW, ds, idx, visible, q_run, q_shift, k_pos, offs_n, n_valid,
                   start_m, start_n, BIAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Adds a tile's dS [BLOCK_M, BLOCK_N] (zero where not visible) to the bias-by-distance
    gradient row ``DBIAS_ROW`` [2 R + 1], reduced inside the tile first.

    With consecutive query and key positions (``_position_run``: every tile but those a
    segment boundary crosses) the distance is constant along each diagonal j - i, so the tile
    sums its BLOCK_M + BLOCK_N - 1 diagonals (gathers skew them into columns) and adds one
    atomic per distance index, the saturated ends (|distance| >= R) folded into one each: one
    atomic per index per tile instead of one per element, where ~100 programs of a head
    contend for the same ~2 R addresses. Other tiles add per element, as before. Same sums
    up to fp32 rounding (the order differs).
    """
    k_run, k_shift = _position_run(k_pos, offs_n, n_valid)
    # Key tiles wider than 32 take the per-element path: the skew's temporaries would spill
    # the dQ kernel's registers (tools/kernel_report.py: 32x64 tiles spill, 32x32 do not).
    if (BLOCK_N <= 32) & q_run & k_run:
        # diagonals c = j - i + BLOCK_M - 1 in [0, BLOCK_M + BLOCK_N - 1), 16 at a time
        # (small temporaries: the dQ kernel's registers are nearly all taken)
        WIDTH: tl.constexpr = 16
        CHUNKS: tl.constexpr = (BLOCK_M + BLOCK_N + WIDTH - 2) // WIDTH
        rows = tl.arange(0, BLOCK_M)[:, None]
        base = (k_shift - q_shift) + (start_n - start_m) - (BLOCK_M - 1)  # k_pos - q_pos at c=0
        low_sum = 0.0
        high_sum = 0.0
        for chunk in tl.static_range(CHUNKS):
            c = chunk * WIDTH + tl.arange(0, WIDTH)
            j = c[None, :] - (BLOCK_M - 1) + rows  # [BLOCK_M, WIDTH]
            on_tile = (j >= 0) & (j < BLOCK_N)
            skewed = tl.gather(ds, tl.minimum(tl.maximum(j, 0), BLOCK_N - 1), axis=1)
            per_diag = tl.sum(tl.where(on_tile, skewed, 0.0), axis=0)  # [WIDTH]
            rel_idx = tl.minimum(tl.maximum(base + c, -BIAS_RANGE), BIAS_RANGE) + BIAS_RANGE
            is_diag = c < BLOCK_M + BLOCK_N - 1
            low = is_diag & (rel_idx == 0)
            high = is_diag & (rel_idx == 2 * BIAS_RANGE)
            tl.atomic_add(DBIAS_ROW + rel_idx, per_diag,
                          mask=is_diag & ~low & ~high & (per_diag != 0.0), sem="relaxed")
            low_sum += tl.sum(tl.where(low, per_diag, 0.0), axis=0)
            high_sum += tl.sum(tl.where(high, per_diag, 0.0), axis=0)
        if low_sum != 0.0:
            tl.atomic_add(DBIAS_ROW, low_sum, sem="relaxed")
        if high_sum != 0.0:
            tl.atomic_add(DBIAS_ROW + 2 * BIAS_RANGE, high_sum, sem="relaxed")
    else:
        tl.atomic_add(DBIAS_ROW + idx, ds, mask=visible, sem="relaxed")
