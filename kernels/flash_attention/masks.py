"""Jit helpers shared by the forward and backward kernels: visibility of a tile and the
ranges of key / query blocks a block can see (tiles outside are skipped)."""

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
def _query_range(KSPAN, PREFIX_MAX, b, pid_n, offs_n, q_len, k_len, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_SEG: tl.constexpr):
    """[start, end) of the queries that can see a key block (start a multiple of BLOCK_M).

    Query blocks before the key block see it only through a prefix; segment ids bound both
    sides through KSPAN [batch, k_len, 2], each key's segment's first and one-past-last query.
    """
    start = 0
    end = q_len
    causal_start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    if MODE == _CAUSAL:
        start = causal_start
    if MODE == _PREFIX:
        start = tl.where(pid_n * BLOCK_N < tl.load(PREFIX_MAX + b), 0, causal_start)
    if HAS_SEG:
        span = KSPAN + (b * k_len + offs_n) * 2
        n_valid = offs_n < k_len
        first = tl.min(tl.load(span, mask=n_valid, other=q_len), axis=0)
        start = tl.maximum(start, (first // BLOCK_M) * BLOCK_M)
        end = tl.minimum(end, tl.max(tl.load(span + 1, mask=n_valid, other=0), axis=0))
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
