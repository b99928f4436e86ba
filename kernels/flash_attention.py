"""FlashAttention-2 style fused attention with the study's masks and T5 relative position bias.

One Triton kernel family covers every attention of the study, the mask being a compile-time
mode (same integers as ``megarch.model.attention.MaskMode``; this file does not import megarch,
so it can be taken alone):

- ``CAUSAL`` (0): key j is visible from query i iff same segment and ``j <= i``.
- ``PREFIX`` (1): same segment and (``j <= i`` or ``j < prefix_len[i]``); ``prefix_len`` is
  [batch] (one prefix per row) or [batch, q_len] (one value per query, for packed rows).
- ``BIDIRECTIONAL`` (2): same segment.
- ``CROSS`` (3): q_len may differ from k_len; query i sees key j iff their segments match.

Segment ids ([batch, len], 1, 2, ... per packed segment, 0 = padding): attention never crosses
segments and a padding key is visible to no query; a query that sees no key outputs exactly 0
(and gets zero gradients), never NaN. Omitted segment ids mean one segment without padding.

The optional T5 relative position bias is computed in the kernel from ``q_positions`` /
``k_positions`` ([batch, len], positions within each segment) and the learned table
``[num_buckets, heads]``: the launcher turns the table into a per-head bias by clamped distance
(``[heads, 2 R + 1]``, exact because T5 buckets saturate beyond ``max_distance``) and the
kernels gather from it; its gradient is accumulated with atomics and flows back to the table
through ordinary autograd indexing.

Attention dropout (``dropout_p`` > 0, a compile-time flag: 0 builds the kernels without it)
drops probabilities by a counter-based Philox draw per (batch, head, query, key) element from
``dropout_seed``, so the backward regenerates the forward's mask instead of storing it
(``dropout_mask`` returns it; the algebra is in ``_backward``'s docstring).

Layout: q [batch, heads, q_len, head_dim], k/v [batch, heads, k_len, head_dim] (any strides);
fp16 / bf16 / fp32 inputs (fp32 dots in 3xTF32), fp32 accumulation; any sequence length; head
dims up to 256 (32/64/128 tuned).

Tiles no query of a block can see are skipped: past the diagonal (causal; prefix beyond the
block's longest prefix) and outside the blocks' segments (packed rows). The forward saves the
log-sum-exp; the backward recomputes the probabilities (FlashAttention-2), one kernel for
dK/dV over key blocks and one for dQ over query blocks, which also adds the bias gradient with
atomics (so that one gradient is not bitwise deterministic).

Tiles: on a GPU each kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) is autotuned per
(kernel, mode, segments, bias, dropout, head dim, dtype, sequence-length bucket) from
``candidate_block_configs``, timed once on the first call's tensors; under the interpreter the
fixed ``default_block_configs`` are used. ``MEGARCH_FLASH_CONFIG`` forces them ("default", or
e.g. "fwd=128x64x8x3,bwd=32x64x4x2"); explicit ``fwd_config`` / ``bwd_config`` win over both.

Order (the Triton tutorial's): jit kernels, launcher, autograd Function, public function,
plain-PyTorch reference ``flash_attention_ref``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

CAUSAL = 0
PREFIX = 1
BIDIRECTIONAL = 2
CROSS = 3
MODE_NAMES = {CAUSAL: "causal", PREFIX: "prefix", BIDIRECTIONAL: "bidirectional", CROSS: "cross"}

# Compile-time copies for the kernels (a jit function may only read constexpr globals).
_CAUSAL = tl.constexpr(CAUSAL)
_PREFIX = tl.constexpr(PREFIX)
_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels use exp2


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


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
def _distance_index(q_pos, k_pos, BIAS_RANGE: tl.constexpr):
    """Index into a [2 R + 1] bias-by-distance row of ``k_pos - q_pos`` clamped to [-R, R]."""
    rel = k_pos[None, :] - q_pos[:, None]
    rel = tl.minimum(tl.maximum(rel, -BIAS_RANGE), BIAS_RANGE)
    return rel + BIAS_RANGE


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
def _dropout_keep(seed, pid_bh, offs_m, start_n, k_len, dropout_p, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] attention-dropout keep mask of keys ``start_n`` (even) + [0, BLOCK_N)
    for queries ``offs_m`` of (batch * heads + head) ``pid_bh``.

    Counter-based (Philox-4x32, 10 rounds, key = the 64-bit seed): the key pair (j, j + 1),
    j even, of query i takes words 0 and 1 of Philox(counter = (i * k_len + j, pid_bh, 0, 0))
    as uniforms u in [0, 1); an element is kept iff u >= dropout_p. One call per pair halves
    the Philox work, and the pairs are the adjacent columns one thread holds in the MMA
    layouts of sm_80 / sm_90, so the join costs no layout conversion (all four words would).
    The bits depend on the element only, never on the tile, so every kernel and tile config
    (and ``dropout_mask``) regenerates the same mask without storing it. Needs
    q_len * k_len < 2**31 (the launcher checks).
    """
    offs_pair = start_n + 2 * tl.arange(0, BLOCK_N // 2)
    offset = offs_m[:, None] * k_len + offs_pair[None, :]  # [BLOCK_M, BLOCK_N // 2] int32
    zero = tl.zeros_like(offset)
    even, odd, _, _ = tl.philox(seed, offset, zero + pid_bh, zero, zero)
    bits = tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_N))  # key j + t: word t
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(
    Q, K, V, OUT, LSE, QSEG, KSEG, QSPAN, PREFIX, BIAS, QPOS, KPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_pb, stride_pm,
    n_heads, q_len, k_len, scale, dropout_p, seed,
    MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block of one (batch, head): online softmax over the visible key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < q_len
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q_seg, prefix, q_pos = _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len, stride_pb,
                                          stride_pm, MODE, HAS_SEG, HAS_BIAS)
    qk_scale = scale * _LOG2E
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    bias_row = BIAS + h * (2 * BIAS_RANGE + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_n, hi_n = _key_range(QSPAN, b, pid_m, offs_m, q_len, k_len, prefix, BLOCK_M, BLOCK_N,
                            MODE, HAS_SEG)
    for start_n in range(lo_n, hi_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        kv_mask = n_valid[None, :] & d_valid[:, None]
        k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=kv_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        k_seg, k_pos = _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG, HAS_BIAS)
        visible = _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix, MODE, HAS_SEG)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            idx = _distance_index(q_pos, k_pos, BIAS_RANGE)
            s += tl.load(bias_row + idx, mask=visible, other=0.0) * _LOG2E
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the undropped softmax's normaliser
        if HAS_DROPOUT:  # 1 / (1 - p) after the loop
            keep = _dropout_keep(seed, pid_bh, offs_m, start_n, k_len, dropout_p, BLOCK_M,
                                 BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2 units
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :] * stride_od, acc.to(OUT.dtype.element_ty), mask=md_mask)
    tl.store(LSE + pid_bh * q_len + offs_m, lse, mask=m_valid)


@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QSEG, KSEG, KSPAN, PREFIX, PREFIX_MAX, BIAS, QPOS, KPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_pb, stride_pm,
    n_heads, q_len, k_len, scale, dropout_p, seed,
    MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of one (batch, head): dK and dV summed over the query blocks that see it.

    DK / DV are contiguous [batch, heads, k_len, head_dim].
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    n_valid = offs_n < k_len
    nd_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    k_seg, k_pos = _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG, HAS_BIAS)
    qk_scale = scale * _LOG2E
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    bias_row = BIAS + h * (2 * BIAS_RANGE + 1)

    lo_m, hi_m = _query_range(KSPAN, PREFIX_MAX, b, pid_n, offs_n, q_len, k_len, BLOCK_M,
                              BLOCK_N, MODE, HAS_SEG)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for block_m in range(lo_m, hi_m, BLOCK_M):
        offs_m = block_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        lse = tl.load(LSE + pid_bh * q_len + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + pid_bh * q_len + offs_m, mask=m_valid, other=0.0)
        q_seg, prefix, q_pos = _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len, stride_pb,
                                              stride_pm, MODE, HAS_SEG, HAS_BIAS)
        visible = _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix, MODE, HAS_SEG)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            idx = _distance_index(q_pos, k_pos, BIAS_RANGE)
            s += tl.load(bias_row + idx, mask=visible, other=0.0) * _LOG2E
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:  # dV = (P o Z)^T dO, dP = Z o (dO V^T) (the _backward docstring)
            keep = _dropout_keep(seed, pid_bh, offs_m, pid_n * BLOCK_N, k_len, dropout_p,
                                 BLOCK_M, BLOCK_N)
            p_kept = tl.where(keep, p, 0.0)  # 1 / (1 - p) on dV after the loop
            dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    out_offs = pid_bh * k_len * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    if HAS_DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DBIAS, QSEG, KSEG, QSPAN, PREFIX, BIAS, QPOS, KPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_pb, stride_pm,
    n_heads, q_len, k_len, scale, dropout_p, seed,
    MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block of one (batch, head): dQ, and the bias gradient added atomically.

    DQ is contiguous [batch, heads, q_len, head_dim]; DBIAS is fp32 [heads, 2 R + 1].
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < q_len
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + pid_bh * q_len + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh * q_len + offs_m, mask=m_valid, other=0.0)
    q_seg, prefix, q_pos = _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len, stride_pb,
                                          stride_pm, MODE, HAS_SEG, HAS_BIAS)
    qk_scale = scale * _LOG2E
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    bias_row = BIAS + h * (2 * BIAS_RANGE + 1)
    dbias_row = DBIAS + h * (2 * BIAS_RANGE + 1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_n, hi_n = _key_range(QSPAN, b, pid_m, offs_m, q_len, k_len, prefix, BLOCK_M, BLOCK_N,
                            MODE, HAS_SEG)
    for start_n in range(lo_n, hi_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        v_t = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                      mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        k_seg, k_pos = _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG, HAS_BIAS)
        visible = _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix, MODE, HAS_SEG)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            idx = _distance_index(q_pos, k_pos, BIAS_RANGE)
            s += tl.load(bias_row + idx, mask=visible, other=0.0) * _LOG2E
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:  # dP = Z o (dO V^T) (the _backward docstring)
            keep = _dropout_keep(seed, pid_bh, offs_m, start_n, k_len, dropout_p, BLOCK_M,
                                 BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            tl.atomic_add(dbias_row + idx, ds, mask=visible)

    out_offs = pid_bh * q_len * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_offs, (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, q_len, k_len, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the keep mask (int8 [batch * heads, q_len, k_len])."""
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, offs_m, tl.program_id(2) * BLOCK_N, k_len, dropout_p,
                         BLOCK_M, BLOCK_N)
    ptrs = OUT + pid_bh.to(tl.int64) * q_len * k_len + offs_m[:, None] * k_len + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch shape of one kernel (fixed, CPU-safe defaults; autotune on top)."""

    block_m: int  # queries per tile (a power of two >= 16: dots need K >= 16)
    block_n: int  # keys per tile (same rule)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two >= 16, got {size}")


def default_block_configs(head_dim: int, dtype: torch.dtype = torch.float16
                          ) -> tuple[BlockConfig, BlockConfig]:
    """(forward, backward) tile configs; both backward kernels share one.

    fp16/bf16: the heaviest variant (prefix + segments + bias) compiles without register spills
    on sm_90 with triton 3.6 and 3.9, and on sm_80 with 3.9 (3.6's sm_80 forward spills
    ~100 bytes); tools/kernel_report.py prints the numbers. fp32 (3xTF32 dots) gets small
    tiles: it is a correctness path, and its backward still spills at head dim 128.
    """
    # Register pressure comes mostly from the per-element mask and bias work on the
    # [block_m, block_n] tile, so tiles stay at <= 32 score elements per thread.
    if dtype == torch.float32:
        return BlockConfig(32, 32, num_warps=4, num_stages=2), BlockConfig(32, 32, num_warps=4)
    if head_dim <= 32:
        return BlockConfig(128, 32, num_warps=4, num_stages=3), BlockConfig(32, 64, num_warps=4)
    if head_dim <= 64:
        return BlockConfig(128, 64, num_warps=8, num_stages=3), BlockConfig(32, 64, num_warps=4)
    return BlockConfig(128, 32, num_warps=8, num_stages=3), BlockConfig(32, 32, num_warps=4)


KERNELS = ("fwd", "dkdv", "dq")  # the forward kernel and the two backward kernels
CONFIG_ENV = "MEGARCH_FLASH_CONFIG"  # "auto" (default), "default", or "fwd=128x64x8x3,bwd=..."


def default_block_config(kernel: str, head_dim: int, dtype: torch.dtype) -> BlockConfig:
    """The fixed default of one kernel ("fwd", "dkdv" or "dq"): ``default_block_configs``."""
    fwd, bwd = default_block_configs(head_dim, dtype)
    return fwd if kernel == "fwd" else bwd


def candidate_block_configs(kernel: str, head_dim: int, dtype: torch.dtype
                            ) -> list[BlockConfig]:
    """The autotuner's candidates for one kernel ("fwd", "dkdv" or "dq"), the default first.

    Each compiles for sm_80 and sm_90 within their shared memory (tests/kernels/test_compile.py;
    ``tools/kernel_report.py --candidates`` prints registers and spills). The forward wants
    long query blocks; dK/dV (outer loop over keys) long key blocks and dQ long query blocks,
    as in FlashAttention-2. fp32 (3xTF32, a correctness path) keeps small tiles.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    default = default_block_config(kernel, head_dim, dtype)
    wide = head_dim > 64  # 128-wide rows: fewer, narrower tiles keep registers in bounds
    if dtype == torch.float32:  # d128: larger backward tiles exceed sm_80's shared memory
        extra = ([BlockConfig(64, 32, 4, 2)] if kernel == "fwd" else
                 [BlockConfig(32, 32, 8, 2)] if wide else
                 [BlockConfig(32, 64, 4, 2)] if kernel == "dkdv" else [BlockConfig(64, 32, 4, 2)])
    elif kernel == "fwd":
        extra = ([BlockConfig(64, 32, 4, 3), BlockConfig(64, 64, 8, 3), BlockConfig(128, 64, 8, 2),
                  BlockConfig(128, 32, 8, 2)] if wide else
                 [BlockConfig(128, 64, 8, 2), BlockConfig(64, 64, 4, 3), BlockConfig(64, 32, 4, 3),
                  BlockConfig(128, 32, 8, 3)])
    elif kernel == "dkdv":
        extra = ([BlockConfig(16, 64, 4, 2), BlockConfig(32, 64, 8, 2), BlockConfig(64, 64, 8, 2),
                  BlockConfig(16, 32, 4, 2)] if wide else
                 [BlockConfig(32, 128, 8, 2), BlockConfig(64, 64, 8, 2), BlockConfig(16, 64, 4, 2),
                  BlockConfig(32, 32, 4, 2)])
    else:
        extra = [BlockConfig(64, 32, 4, 2), BlockConfig(128, 32, 8, 2), BlockConfig(64, 64, 8, 2),
                 BlockConfig(32, 64, 4, 2)]
    return [default] + [config for config in extra if config != default]


def _parse_block_config(text: str) -> BlockConfig:
    fields = text.lower().split("x")
    if len(fields) != 4 or not all(field.isdigit() for field in fields):
        raise ValueError(f"{CONFIG_ENV}: {text!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES "
                         "(e.g. 128x64x8x3)")
    return BlockConfig(*map(int, fields))


@functools.lru_cache(maxsize=16)
def forced_block_configs(setting: str) -> dict[str, BlockConfig] | None:
    """The kernels' configs forced by a ``MEGARCH_FLASH_CONFIG`` value.

    ``""`` / ``"auto"``: none forced ({}): autotune on a GPU, defaults elsewhere. ``"default"``:
    None (the fixed defaults, no tuning). ``"fwd=128x64x8x3,bwd=32x64x4x2"``: those kernels
    (``fwd``, ``dkdv``, ``dq``; ``bwd`` sets both backward kernels); the others as for "auto".
    """
    setting = setting.strip()
    if setting in ("", "auto"):
        return {}
    if setting == "default":
        return None
    forced = {}
    for item in setting.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in (*KERNELS, "bwd") or not value:
            raise ValueError(f"{CONFIG_ENV}={setting!r}: expected 'auto', 'default' or "
                             "comma-separated KERNEL=BMxBNxWARPSxSTAGES with KERNEL one of fwd, "
                             f"bwd, dkdv, dq (e.g. fwd=128x64x8x3,bwd=32x64x4x2), got {item!r}")
        for kernel in (("dkdv", "dq") if name == "bwd" else (name,)):
            forced[kernel] = _parse_block_config(value)
    return forced


def _length_bucket(length: int) -> int:
    """Sequence-length bucket of the tuning key: the next power of two, from 128 to 16384."""
    return min(max(128, triton.next_power_of_2(length)), 16384)


def _tuning_available(device: torch.device) -> bool:
    """Autotuning needs compiled kernels on a GPU (the interpreter cannot time them)."""
    return device.type == "cuda" and not _interpreting()


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


class _Autotuner:
    """The fastest candidate per tuning key, timed on the first call's own tensors, then cached.

    A candidate that fails to launch (e.g. too much shared memory on a smaller GPU) is skipped;
    tiles never change the result beyond rounding, so any candidate is a correct choice.
    """

    def __init__(self, timer=_bench_ms):
        self.timer = timer  # ms of one call of a zero-argument function
        self.cache: dict[tuple, BlockConfig] = {}

    def choose(self, key: tuple, candidates: list[BlockConfig], launch,
               default: BlockConfig | None = None) -> BlockConfig:
        """The fastest of ``candidates``; ``default``, untimed, when memory runs out while
        timing (the timer flushes the GPU cache through a buffer of its own): an out-of-memory
        error is not a candidate's failure."""
        if key in self.cache:
            return self.cache[key]
        times, errors = {}, []
        for config in candidates:
            try:
                times[config] = self.timer(lambda config=config: launch(config))
            except torch.cuda.OutOfMemoryError:  # not the candidate's fault: stop timing
                torch.cuda.empty_cache()
                if default is None:
                    raise
                logger.warning("flash_attention autotune %s: out of memory while timing; "
                               "using the default tiles %s", key, default)
                self.cache[key] = default
                return default
            except Exception as error:  # noqa: BLE001 - skip the candidate, keep the others
                errors.append(error)
                logger.debug("flash_attention autotune %s: %s failed: %s", key, config, error)
        if not times:
            raise RuntimeError(f"flash_attention: no tile config could launch for {key}") \
                from errors[0]
        best = min(times, key=times.get)
        self.cache[key] = best
        logger.info("flash_attention autotune %s: %s (%.3f ms of %d candidates)", key, best,
                    times[best], len(times))
        return best


_AUTOTUNER = _Autotuner()


def _tuning_key(kernel: str, q: torch.Tensor, k_len: int, mode: int, has_seg: bool,
                has_bias: bool, has_dropout: bool = False) -> tuple:
    bucket = _length_bucket(max(q.shape[2], k_len))
    return kernel, mode, has_seg, has_bias, has_dropout, q.shape[-1], q.dtype, bucket


def _block_config(kernel: str, explicit: BlockConfig | None, q: torch.Tensor, k_len: int,
                  mode: int, has_seg: bool, has_bias: bool, launch=None,
                  has_dropout: bool = False) -> BlockConfig:
    """The config one launch uses: explicit > MEGARCH_FLASH_CONFIG > autotuned (GPU) > default.

    With ``launch`` None nothing is timed: a config not tuned yet reads as the default.
    """
    if explicit is not None:
        return explicit
    forced = forced_block_configs(os.environ.get(CONFIG_ENV, ""))
    if forced is not None and kernel in forced:
        return forced[kernel]
    default = default_block_config(kernel, q.shape[-1], q.dtype)
    if forced is None or not _tuning_available(q.device):
        return default
    key = _tuning_key(kernel, q, k_len, mode, has_seg, has_bias, has_dropout)
    if launch is None:
        return _AUTOTUNER.cache.get(key, default)
    candidates = candidate_block_configs(kernel, q.shape[-1], q.dtype)
    return _AUTOTUNER.choose(key, candidates, launch, default)


def selected_block_configs(q: torch.Tensor, k_len: int, mode: int, *, has_segments: bool = False,
                           has_bias: bool = False, has_dropout: bool = False
                           ) -> dict[str, BlockConfig]:
    """The config each kernel would use now for such a call (tuned ones once a call ran)."""
    return {kernel: _block_config(kernel, None, q, k_len, int(mode), has_segments, has_bias,
                                  has_dropout=has_dropout)
            for kernel in KERNELS}


_SEED_FLAG = 1 << 62


def _kernel_seed(seed: int) -> int:
    """The kernels' form of a dropout seed: its low 62 bits with bit 62 set, so Triton always
    passes it as one int64 (never int32, never specialised to a constant); seeds equal
    modulo 2**62 draw the same masks."""
    return (int(seed) & (_SEED_FLAG - 1)) | _SEED_FLAG


@dataclass
class _MaskArgs:
    """Mask and bias inputs in kernel form (int32, contiguous), built once per call."""

    mode: int
    q_seg: torch.Tensor | None  # [batch, q_len]
    k_seg: torch.Tensor | None  # [batch, k_len]
    q_span: torch.Tensor | None  # [batch, q_len, 2]: keys [first, end) of each query's segment
    k_span: torch.Tensor | None  # [batch, k_len, 2]: queries [first, end) of each key's segment
    prefix: torch.Tensor | None  # [batch] or [batch, q_len]
    prefix_max: torch.Tensor | None  # [batch]
    q_pos: torch.Tensor | None  # [batch, q_len]
    k_pos: torch.Tensor | None  # [batch, k_len]
    bias_range: int  # R: the bias-by-distance table holds distances -R..R
    scale: float
    fwd_config: BlockConfig | None  # None: chosen at launch (_block_config)
    dkdv_config: BlockConfig | None
    dq_config: BlockConfig | None
    dropout_p: float = 0.0  # attention dropout; 0 compiles the kernels without it
    dropout_seed: int = _SEED_FLAG  # kernel form (_kernel_seed)

    @property
    def has_seg(self) -> bool:
        return self.q_seg is not None

    def prefix_strides(self) -> tuple[int, int]:
        if self.prefix is None:
            return 0, 0
        return (self.prefix.stride(0), 0) if self.prefix.dim() == 1 else self.prefix.stride()


def _interpreting() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (run on CPU tensors)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: int) -> None:
    if mode not in MODE_NAMES:
        raise ValueError(f"mode must be one of {MODE_NAMES} (CAUSAL=0 ... CROSS=3), got {mode}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, len, head_dim], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (batch, heads and head_dim must agree)")
    if mode != CROSS and q.shape[2] != k.shape[2]:
        raise ValueError(f"{MODE_NAMES[mode]} self-attention needs q_len == k_len, got "
                         f"{q.shape[2]} and {k.shape[2]}; use mode=CROSS")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                               torch.float32):
        raise TypeError(f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"flash_attention needs CUDA tensors (got {q.device}); on CPU use "
                         "flash_attention_ref, or set TRITON_INTERPRET=1 before importing")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} > 256 is not supported")


def _int_rows(name: str, x: torch.Tensor | None, batch: int, length: int,
              device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    if x.shape != (batch, length):
        raise ValueError(f"{name} must be [batch, len] = {(batch, length)}, got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int32).contiguous()


def _segments(mode, q_seg, k_seg, batch, q_len, k_len, device):
    """Kernel-form segment ids: both or neither (the kernel then tests equality and k != 0)."""
    q_seg = _int_rows("q_segment_ids", q_seg, batch, q_len, device)
    k_seg = _int_rows("k_segment_ids", k_seg, batch, k_len, device)
    if mode != CROSS and k_seg is None:
        k_seg = q_seg
    if q_seg is None and k_seg is None:
        return None, None
    if q_seg is None:  # key padding only: every query is in "segment 1"
        return torch.ones(batch, q_len, dtype=torch.int32, device=device), (k_seg != 0).int()
    if k_seg is None:  # query padding only: padding queries see nothing
        return (q_seg != 0).int(), torch.ones(batch, k_len, dtype=torch.int32, device=device)
    return q_seg, k_seg


def _segment_spans(seg_a: torch.Tensor, seg_b: torch.Tensor) -> torch.Tensor:
    """For each position of ``seg_a`` [batch, len_a], the [first, last + 1) positions of its
    segment id in ``seg_b`` [batch, len_b]: int32 [batch, len_a, 2], for tile skipping.

    Padding (0) gets an empty span. Ids are 1, 2, ... (so at most max(len_a, len_b)); any other
    id gets the whole row, which is always safe. No host synchronisation.
    """
    batch, len_b = seg_b.shape
    overflow = max(seg_a.shape[1], len_b) + 1  # the slot of out-of-range ids
    ids_a, ids_b = (torch.where((s >= 0) & (s < overflow), s, overflow).long()
                    for s in (seg_a, seg_b))
    positions = torch.arange(len_b, device=seg_b.device).expand(batch, len_b)
    first = torch.full((batch, overflow + 1), len_b, dtype=torch.long, device=seg_b.device)
    first = first.scatter_reduce(1, ids_b, positions, "amin")
    end = torch.zeros((batch, overflow + 1), dtype=torch.long, device=seg_b.device)
    end = end.scatter_reduce(1, ids_b, positions + 1, "amax")
    first[:, 0], end[:, 0] = len_b, 0  # padding sees nothing
    first[:, overflow], end[:, overflow] = 0, len_b
    span = torch.stack((first.gather(1, ids_a), end.gather(1, ids_a)), dim=-1)
    return span.to(torch.int32).contiguous()


def _prefix(mode, prefix_len, batch, q_len, device):
    if mode != PREFIX:
        return None, None
    if prefix_len is None:
        raise ValueError("mode PREFIX needs prefix_len ([batch] or [batch, q_len])")
    if prefix_len.shape not in ((batch,), (batch, q_len)):
        raise ValueError(f"prefix_len must be [batch] or [batch, q_len] = {(batch, q_len)}, "
                         f"got {tuple(prefix_len.shape)}")
    prefix = prefix_len.to(device=device, dtype=torch.int32).contiguous()
    prefix_max = prefix.reshape(batch, -1).amax(dim=1).contiguous()  # [batch]
    return prefix, prefix_max


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs mean the caller asked for fp32 accuracy: 3xTF32 keeps it on tensor cores
    # ("ieee" falls back to FMA loops that spill kilobytes).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _common_args(q, k, v, do, mask: _MaskArgs):
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *mask.prefix_strides())
    return strides, (q.shape[1], q.shape[2], k.shape[2], mask.scale, mask.dropout_p,
                     mask.dropout_seed)


def _constexprs(q: torch.Tensor, mask: _MaskArgs, config: BlockConfig, has_bias: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(MODE=mask.mode, HAS_SEG=mask.has_seg, HAS_BIAS=has_bias,
                HAS_DROPOUT=mask.dropout_p > 0.0, BIAS_RANGE=mask.bias_range, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=config.num_warps, num_stages=config.num_stages)


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _Pointers:
    """Optional kernel inputs: the tensor, or a one-element placeholder the kernel never reads."""

    def __init__(self, device):
        self.device = device

    def __call__(self, tensor: torch.Tensor | None, dtype: torch.dtype = torch.int32):
        return tensor if tensor is not None else torch.zeros(1, dtype=dtype, device=self.device)


def _forward(q, k, v, bias, mask: _MaskArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (out [b, h, q_len, d] in q's dtype, lse [b, h, q_len] fp32)."""
    batch, heads, q_len, _ = q.shape
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((batch, heads, q_len), torch.float32, q.device)
    p = _Pointers(q.device)
    strides, sizes = _common_args(q, k, v, out, mask)
    has_bias = bias is not None

    def launch(cfg: BlockConfig) -> None:
        _fwd_kernel[(triton.cdiv(q_len, cfg.block_m), batch * heads)](
            q, k, v, out, lse, p(mask.q_seg), p(mask.k_seg), p(mask.q_span), p(mask.prefix),
            p(bias, torch.float32), p(mask.q_pos), p(mask.k_pos),
            *strides, *sizes, **_constexprs(q, mask, cfg, has_bias),
        )

    launch(_block_config("fwd", mask.fwd_config, q, k.shape[2], mask.mode, mask.has_seg,
                         has_bias, launch, has_dropout=mask.dropout_p > 0.0))
    return out, lse


def _backward(q, k, v, out, lse, do, bias, mask: _MaskArgs):
    """Launch the backward kernels: (dq, dk, dv, dbias or None).

    Attention dropout (FlashAttention-2): with P = softmax(S) the undropped probabilities
    (recomputed from the saved log-sum-exp, which the forward takes before dropout), Z the
    keep mask scaled by 1 / (1 - p) (zero where dropped), the forward is O = (P o Z) V. Then
    dV = (P o Z)^T dO; the gradient of the dropped probabilities is dO V^T, so that of P is
    dP = Z o (dO V^T); and the softmax backward dS = P o (dP - D) needs the row sums
    D = rowsum(dP o P) = rowsum((dO V^T) o (P o Z)) = rowsum(dO o ((P o Z) V)) = rowsum(dO o O):
    the same ``delta`` as without dropout, from the dropped output. The kernels regenerate Z
    from (seed, element) instead of storing it.
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [batch, heads, q_len]
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    dbias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
    p = _Pointers(q.device)
    strides, sizes = _common_args(q, k, v, do, mask)
    has_bias = bias is not None

    def launch_dkdv(cfg: BlockConfig) -> None:
        _bwd_dkdv_kernel[(triton.cdiv(k_len, cfg.block_n), batch * heads)](
            q, k, v, do, lse, delta, dk, dv, p(mask.q_seg), p(mask.k_seg), p(mask.k_span),
            p(mask.prefix), p(mask.prefix_max), p(bias, torch.float32), p(mask.q_pos),
            p(mask.k_pos), *strides, *sizes, **_constexprs(q, mask, cfg, has_bias),
        )

    def launch_dq(cfg: BlockConfig) -> None:
        if dbias is not None:
            dbias.zero_()  # accumulated with atomics: every (tuning) launch starts from zero
        _bwd_dq_kernel[(triton.cdiv(q_len, cfg.block_m), batch * heads)](
            q, k, v, do, lse, delta, dq, p(dbias, torch.float32), p(mask.q_seg),
            p(mask.k_seg), p(mask.q_span), p(mask.prefix), p(bias, torch.float32),
            p(mask.q_pos), p(mask.k_pos), *strides, *sizes, **_constexprs(q, mask, cfg, has_bias),
        )

    for kernel, explicit, launch in (("dkdv", mask.dkdv_config, launch_dkdv),
                                     ("dq", mask.dq_config, launch_dq)):
        launch(_block_config(kernel, explicit, q, k_len, mask.mode, mask.has_seg, has_bias,
                             launch, has_dropout=mask.dropout_p > 0.0))
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable in q, k, v and the per-head bias-by-distance table ``[heads, 2 R + 1]``.

    Attention dropout travels in ``mask`` (``dropout_p``, ``dropout_seed``): the backward
    regenerates the forward's keep mask from the seed.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask: _MaskArgs):
        out, lse = _forward(q, k, v, bias, mask)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, bias = ctx.saved_tensors
        dq, dk, dv, dbias = _backward(q, k, v, out, lse, do, bias, ctx.mask)
        return dq, dk, dv, dbias, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


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


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: int,
    *,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    rel_bias_table: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    bidirectional_buckets: bool | None = None,
    num_buckets: int = 32,
    max_distance: int = 128,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    fwd_config: BlockConfig | None = None,
    bwd_config: BlockConfig | tuple[BlockConfig, BlockConfig] | None = None,
) -> torch.Tensor:
    """Fused masked attention ``softmax(q k^T * scale + T5 bias, masked) v`` (module docstring).

    Args:
        q: [batch, heads, q_len, head_dim]; k, v: [batch, heads, k_len, head_dim]; one dtype of
            fp16 / bf16 / fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        mode: CAUSAL (0), PREFIX (1), BIDIRECTIONAL (2) or CROSS (3).
        q_segment_ids, k_segment_ids: [batch, q_len] / [batch, k_len], 0 = padding; for the
            self-attention modes k_segment_ids defaults to q_segment_ids.
        prefix_len: PREFIX only: [batch] or [batch, q_len].
        rel_bias_table: T5 relative bias table [num_buckets, heads] (differentiable), or None.
        q_positions, k_positions: [batch, q_len] / [batch, k_len] positions for the bias
            (default 0..len-1).
        bidirectional_buckets: T5 bucketing by sign of the distance; default True for
            BIDIRECTIONAL and CROSS, False (causal bucketing) for CAUSAL and PREFIX.
        num_buckets, max_distance: T5 bucketing parameters (num_buckets must match the table).
        scale: logit scale, default head_dim ** -0.5.
        dropout_p: attention dropout on the probabilities, in [0, 1) (pass 0 when not
            training); kept ones are scaled by 1 / (1 - dropout_p). 0 runs kernels compiled
            without it.
        dropout_seed: an int picking the masks (``dropout_mask`` returns them; seeds equal
            modulo 2**62 give the same); None: drawn from the global torch CPU generator
            (no device synchronisation).
        fwd_config, bwd_config: tile overrides; ``bwd_config`` is one config for both backward
            kernels or a (dK/dV, dQ) pair. Default: ``MEGARCH_FLASH_CONFIG``, else autotuned
            on a GPU (``candidate_block_configs``), else ``default_block_configs``.

    Returns [batch, heads, q_len, head_dim] in q's dtype; queries that see no key give zeros.
    """
    mode = int(mode)
    _check_inputs(q, k, v, mode)
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    device = q.device
    q_seg, k_seg = _segments(mode, q_segment_ids, k_segment_ids, batch, q_len, k_len, device)
    q_span = k_span = None
    if q_seg is not None:
        q_span = _segment_spans(q_seg, k_seg)
        k_span = q_span if q_seg is k_seg else _segment_spans(k_seg, q_seg)
    prefix, prefix_max = _prefix(mode, prefix_len, batch, q_len, device)
    bias, q_pos, k_pos, r = None, None, None, 0
    if rel_bias_table is not None:
        if rel_bias_table.shape != (num_buckets, heads):
            raise ValueError(f"rel_bias_table must be [num_buckets, heads] = "
                             f"{(num_buckets, heads)}, got {tuple(rel_bias_table.shape)}")
        if bidirectional_buckets is None:
            bidirectional_buckets = mode in (BIDIRECTIONAL, CROSS)
        r = bias_range(num_buckets, max_distance)
        bias = bias_by_distance(rel_bias_table.to(device), bidirectional_buckets, max_distance)
        q_pos = _default_positions(q_positions, batch, q_len, device, "q_positions")
        k_pos = _default_positions(k_positions, batch, k_len, device, "k_positions")
    dkdv_config, dq_config = (bwd_config if isinstance(bwd_config, tuple)
                              else (bwd_config, bwd_config))
    mask = _MaskArgs(mode, q_seg, k_seg, q_span, k_span, prefix, prefix_max, q_pos, k_pos, r,
                     head_dim ** -0.5 if scale is None else float(scale),
                     fwd_config, dkdv_config, dq_config,
                     *_dropout_args(dropout_p, dropout_seed, q_len, k_len))
    return FlashAttentionFunction.apply(q, k, v, bias, mask)


def _dropout_args(dropout_p: float, seed: int | None, q_len: int, k_len: int
                  ) -> tuple[float, int]:
    """(p, kernel-form seed) of ``flash_attention``'s dropout arguments, checked."""
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return 0.0, _SEED_FLAG
    if q_len * k_len >= 1 << 31:
        raise ValueError(f"attention dropout needs q_len * k_len < 2**31 (the mask's Philox "
                         f"counter), got {q_len} x {k_len}")
    if seed is None:
        seed = int(torch.randint(1 << 62, ()).item())  # global CPU generator: no device sync
    return dropout_p, _kernel_seed(seed)


def dropout_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The keep mask ``flash_attention(..., dropout_p=dropout_p, dropout_seed=seed)`` applies:
    bool [batch, heads, q_len, k_len] for ``shape`` = (batch, heads, q_len, k_len), True =
    kept (it scales kept probabilities by 1 / (1 - dropout_p)). Drawn by a Triton kernel
    sharing the attention kernels' RNG, so on CUDA (or CPU under ``TRITON_INTERPRET=1``).
    """
    batch, heads, q_len, k_len = shape
    p, kernel_seed = _dropout_args(dropout_p, seed, q_len, k_len)
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    out = torch.empty((batch * heads, q_len, k_len), dtype=torch.int8, device=device)
    if out.device.type != "cuda" and not _interpreting():
        raise ValueError(f"dropout_mask needs a CUDA device (got {out.device}), or "
                         "TRITON_INTERPRET=1 set before importing")
    block = 64
    grid = (batch * heads, triton.cdiv(q_len, block), triton.cdiv(k_len, block))
    _dropout_mask_kernel[grid](out, q_len, k_len, p, kernel_seed, BLOCK_M=block, BLOCK_N=block)
    return out.view(shape).bool()


def _default_positions(positions, batch, length, device, name) -> torch.Tensor:
    if positions is None:
        return torch.arange(length, dtype=torch.int32, device=device).expand(batch, -1).contiguous()
    return _int_rows(name, positions, batch, length, device)


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch reference (same semantics)
# ---------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5 bucket of ``relative_position = key_pos - query_pos`` (int64, same shape).

    Half of each direction's buckets are exact distances, the rest log-spaced up to
    ``max_distance`` (then saturating); bidirectional bucketing gives keys after the query the
    upper half of the buckets, causal bucketing maps every later key to bucket 0. Float32 log
    with a float32 epsilon, as T5X, so exact powers land on their own bucket.
    """
    distance = -relative_position.long()  # > 0: the key precedes the query
    offset = torch.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        offset = (distance < 0).long() * num_buckets
        distance = distance.abs()
    else:
        distance = distance.clamp(min=0)
    max_exact = num_buckets // 2
    ratio = distance.float() / max_exact + torch.finfo(torch.float32).eps
    log_bucket = max_exact + (
        torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, log_bucket)


def attention_mask_ref(mode: int, q_len: int, k_len: int, q_segment_ids=None, k_segment_ids=None,
                       prefix_len=None, device=None) -> torch.Tensor:
    """Boolean visibility ``[batch or 1, q_len, k_len]`` (True = visible), the module's rules."""
    if mode != CROSS and k_segment_ids is None:
        k_segment_ids = q_segment_ids
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    mask = torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)
    if mode == CAUSAL:
        mask = mask & (j <= i)
    elif mode == PREFIX:
        prefix = prefix_len.to(device).reshape(prefix_len.shape[0], -1)  # [batch, 1 or q_len]
        mask = mask & ((j <= i) | (j < prefix[:, :, None]))
    if k_segment_ids is not None:
        mask = mask & (k_segment_ids.to(device) != 0)[:, None, :]
        if q_segment_ids is not None:
            same = q_segment_ids.to(device)[:, :, None] == k_segment_ids.to(device)[:, None, :]
            mask = mask & same
    elif q_segment_ids is not None:
        mask = mask & (q_segment_ids.to(device) != 0)[:, :, None]
    return mask


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: int,
    *,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    rel_bias_table: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    bidirectional_buckets: bool | None = None,
    num_buckets: int = 32,
    max_distance: int = 128,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``flash_attention`` in plain PyTorch (materialised scores; any device; autograd).

    Computes in float32 (float64 inputs stay float64); returns q's dtype. Attention dropout
    takes its keep mask explicitly: ``dropout_mask`` bool [batch, heads, q_len, k_len] (the
    kernel's for a seed: module function ``dropout_mask``), kept probabilities scaled by
    1 / (1 - dropout_p).
    """
    mode = int(mode)
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [b,h,q,k]
    if rel_bias_table is not None:
        if bidirectional_buckets is None:
            bidirectional_buckets = mode in (BIDIRECTIONAL, CROSS)
        if q_positions is None:
            q_positions = torch.arange(q_len, device=q.device).expand(batch, -1)
        if k_positions is None:
            k_positions = torch.arange(k_len, device=q.device).expand(batch, -1)
        relative = k_positions.long()[:, None, :] - q_positions.long()[:, :, None]  # [b, q, k]
        buckets = relative_position_bucket(relative, bidirectional_buckets, num_buckets,
                                           max_distance)
        bias = rel_bias_table.to(compute)[buckets].permute(0, 3, 1, 2)  # [b, h, q, k]
        scores = scores + bias
    mask = attention_mask_ref(mode, q_len, k_len, q_segment_ids, k_segment_ids, prefix_len,
                              device=q.device)[:, None]  # [b or 1, 1, q, k]
    visible_row = mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~visible_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible_row, 0.0)
    if dropout_p > 0.0:
        if dropout_mask is None or dropout_mask.shape != probs.shape:
            raise ValueError(f"dropout_p > 0 needs dropout_mask of shape {tuple(probs.shape)} "
                             "(e.g. dropout_mask(seed, shape, p)), got "
                             f"{None if dropout_mask is None else tuple(dropout_mask.shape)}")
        probs = probs.masked_fill(~dropout_mask.to(probs.device), 0.0) / (1.0 - dropout_p)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
