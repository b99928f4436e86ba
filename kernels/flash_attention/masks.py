"""Jit helpers shared by the forward and backward kernels: visibility of a tile, the ranges
of key / query blocks a block can see (tiles outside are skipped), and within them the ranges
of free tiles, fully visible and in bounds, that the kernels run without mask arithmetic."""

from __future__ import annotations

import triton
import triton.language as tl

from .modes import _CAUSAL, _PREFIX


def _interpreting() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (run on CPU tensors)."""
    return not isinstance(_tile_visible, triton.runtime.JITFunction)


@triton.jit
def _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix,
                  MODE: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] visibility of keys offs_n from queries offs_m (bounds included)."""
    visible = (offs_m[:, None] < q_len) & (offs_n[None, :] < k_len)
    if MODE == _CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if MODE == _PREFIX:
        visible = visible & ((offs_n[None, :] <= offs_m[:, None])
                             | (offs_n[None, :] < prefix[:, None]))
    if HAS_SEG:
        visible = visible & (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    return visible



@triton.jit
def _key_range(QSPAN, b, pid_m, offs_m, q_len, k_len, prefix, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_SEG: tl.constexpr):
    """[start, end) of the keys a query block can see; tiles outside are skipped.

    Causal / prefix bound the end; segment ids bound both sides through QSPAN [batch, q_len, 2],
    each query's segment's first and one-past-last key.
    """
    start = 0
    end = k_len
    if MODE == _CAUSAL:
        end = tl.minimum(k_len, (pid_m + 1) * BLOCK_M)
    if MODE == _PREFIX:
        end = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M, tl.max(prefix, axis=0)))
    if HAS_SEG:
        span = QSPAN + (b * q_len + offs_m) * 2
        m_valid = offs_m < q_len
        first = tl.min(tl.load(span, mask=m_valid, other=k_len), axis=0)
        start = (first // BLOCK_N) * BLOCK_N
        end = tl.minimum(end, tl.max(tl.load(span + 1, mask=m_valid, other=0), axis=0))
    return start, end


@triton.jit
def _query_range(KSPAN, PREFIX_RANGE, b, pid_n, offs_n, q_len, k_len, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_SEG: tl.constexpr):
    """[start, end) of the queries that can see a key block (start a multiple of BLOCK_M).

    Query blocks before the key block see it only through a prefix (PREFIX_RANGE [batch, 2]:
    each row's longest and shortest prefix); segment ids bound both sides through KSPAN
    [batch, k_len, 2], each key's segment's first and one-past-last query.
    """
    start = 0
    end = q_len
    causal_start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    if MODE == _CAUSAL:
        start = causal_start
    if MODE == _PREFIX:
        start = tl.where(pid_n * BLOCK_N < tl.load(PREFIX_RANGE + 2 * b), 0, causal_start)
    if HAS_SEG:
        span = KSPAN + (b * k_len + offs_n) * 2
        n_valid = offs_n < k_len
        first = tl.min(tl.load(span, mask=n_valid, other=q_len), axis=0)
        start = tl.maximum(start, (first // BLOCK_M) * BLOCK_M)
        end = tl.minimum(end, tl.max(tl.load(span + 1, mask=n_valid, other=0), axis=0))
    return start, end


# Free tiles. Without segment ids each query's visible keys are one run from key 0: all of
# them (bidirectional / cross), [0, i] (causal) or [0, max(i + 1, prefix_i)) (prefix). So the
# free key tiles of a query block are a run [lo, end) at the start of its key range (the
# forward: free tiles, then masked ones, in ascending key order; dQ: masked ones first), and
# the free query blocks of a key block a run in the middle of its query range (the dK/dV
# loop: the masked blocks below it and at most one partial block above it, then the free
# ones). With segment ids a tile is free only if one segment covers it, which costs a
# per-tile test: those kernels keep the masked loop throughout (the free loops compiled out).


@triton.jit
def _free_key_end(pid_m, offs_m, q_len, k_len, prefix, lo_n, hi_n, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_SEG: tl.constexpr):
    """End of the free key tiles [lo_n, end) of query block ``pid_m`` (lo_n <= end <= hi_n,
    a whole number of BLOCK_N tiles from lo_n): every key of each is in bounds and visible to
    every query of the block, which is all in bounds. ``prefix``: the block's per-query prefix
    lengths (``_load_row_info``; 0 past q_len)."""
    end = (k_len // BLOCK_N) * BLOCK_N  # whole key tiles only
    if MODE == _CAUSAL:  # keys <= the block's first query
        end = tl.minimum(end, ((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
    if MODE == _PREFIX:  # query i sees [0, max(i + 1, prefix_i)): the block's shortest run
        seen = tl.min(tl.maximum(offs_m + 1, prefix), axis=0)
        end = tl.minimum(end, (seen // BLOCK_N) * BLOCK_N)
    if HAS_SEG:
        end = lo_n
    end = tl.where((pid_m + 1) * BLOCK_M <= q_len, end, lo_n)  # a partial query block: none
    return tl.minimum(tl.maximum(end, lo_n), hi_n)


@triton.jit
def _free_query_range(PREFIX_RANGE, b, pid_n, q_len, k_len, lo_m, hi_m,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                      HAS_SEG: tl.constexpr):
    """[start, end) of the free query blocks of key block ``pid_n`` within its query range
    [lo_m, hi_m) (``_query_range``; lo_m <= start <= end <= hi_m, multiples of BLOCK_M from
    lo_m): every query of each is in bounds and sees every key of the block, which is all in
    bounds. Prefix: exact for one prefix per row, per-query prefixes use the row's shortest
    (PREFIX_RANGE [batch, 2]: longest, shortest)."""
    end_n = (pid_n + 1) * BLOCK_N
    start = 0
    # query i sees the whole key block iff i >= end_n - 1 (causal), or its prefix covers it
    causal_start = tl.cdiv(end_n - 1, BLOCK_M) * BLOCK_M
    if MODE == _CAUSAL:
        start = causal_start
    if MODE == _PREFIX:
        start = tl.where(tl.load(PREFIX_RANGE + 2 * b + 1) >= end_n, 0, causal_start)
    end = tl.minimum((q_len // BLOCK_M) * BLOCK_M, hi_m)  # whole query blocks only
    if HAS_SEG:
        end = lo_m
    end = tl.maximum(tl.where(end_n <= k_len, end, lo_m), lo_m)  # a partial key block: none
    start = tl.minimum(tl.maximum(start, lo_m), end)
    return start, end


@triton.jit
def _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len, stride_pb, stride_pm,
                   MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-query segment ids, prefix lengths and positions (zeros where unused)."""
    m_valid = offs_m < q_len
    q_seg = tl.zeros_like(offs_m)
    prefix = tl.zeros_like(offs_m)
    q_pos = tl.zeros_like(offs_m)
    if HAS_SEG:
        q_seg = tl.load(QSEG + b * q_len + offs_m, mask=m_valid, other=0)
    if MODE == _PREFIX:
        prefix = tl.load(PREFIX + b * stride_pb + offs_m * stride_pm, mask=m_valid, other=0)
    if HAS_BIAS:
        q_pos = tl.load(QPOS + b * q_len + offs_m, mask=m_valid, other=0)
    return q_seg, prefix, q_pos


@triton.jit
def _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-key segment ids and positions (zeros where unused)."""
    n_valid = offs_n < k_len
    k_seg = tl.zeros_like(offs_n)
    k_pos = tl.zeros_like(offs_n)
    if HAS_SEG:
        k_seg = tl.load(KSEG + b * k_len + offs_n, mask=n_valid, other=0)
    if HAS_BIAS:
        k_pos = tl.load(KPOS + b * k_len + offs_n, mask=n_valid, other=0)
    return k_seg, k_pos



@triton.jit
def _program_ids(length, n_heads, BLOCK: tl.constexpr):
    """(block index, batch * heads index, batch, head) of this program on the folded grid.

    The grid is one axis of ``cdiv(length, BLOCK) * batch * heads`` programs (``_grid``), the
    blocks of one (batch, head) adjacent (they share its K / V in L2): axis 0 allows 2**31 - 1
    programs where axes 1 and 2 stop at 65,535, so any batch x heads launches.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(length, BLOCK)
    pid_bh = pid // n_blocks
    return pid % n_blocks, pid_bh, pid_bh // n_heads, pid_bh % n_heads


@triton.jit
def _head_offset(b, h, stride_b, stride_h):
    """``b * stride_b + h * stride_h`` in int64: the products pass 2**31 elements at GPU-scale
    shapes (batch x heads >= 2,048 at length 8192, head dim 128), where int32 wraps."""
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
