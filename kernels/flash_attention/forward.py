"""The forward kernel: one query block of one (batch, head), online softmax over key blocks.

The key loop is split (FlashAttention-2/3 do the same): the free tiles first, fully visible and
in bounds (``masks._free_key_end``: all of them but the diagonal and the last partial tile of
the unpacked masks), without visibility or bounds arithmetic; then the rest of the visible
range with the mask. One tile body (``_fwd_tile``) serves both loops through ``MASKED``;
the key blocks stay in ascending order, so the split changes no bit of the result.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .bias import _tile_bias
from .dropout import _dropout_keep
from .masks import (
    _free_key_end,
    _head_offset,
    _key_range,
    _load_col_info,
    _load_row_info,
    _program_ids,
    _tile_visible,
)
from .modes import _LOG2E


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, KSEG, KPOS, bias_row, start_n, offs_m, offs_d, d_valid,
              b, pid_bh, q_len, k_len, q_seg, prefix, q_pos, qk_scale, dropout_p, seed,
              stride_kn, stride_kd, stride_vn, stride_vd,
              MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, BIAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile ``start_n`` of the online softmax: the updated (acc, m_i, l_i).

    ``MASKED`` False: a free tile (every element in bounds and visible), so no visibility,
    no key-bounds masks and no guard for rows that see nothing; bias and dropout as masked.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    if MASKED:
        n_valid = offs_n < k_len
        k_t = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        k_seg, k_pos = _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG, HAS_BIAS)
        visible = _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix, MODE, HAS_SEG)
    else:
        k_t = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
        visible = None
        if HAS_BIAS:
            k_pos = tl.load(KPOS + b * k_len + offs_n)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        bias, _ = _tile_bias(bias_row, q_pos, k_pos, visible, BIAS_RANGE, MASKED)
        s += bias
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every row sees the whole tile
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)  # the undropped softmax's normaliser
    if HAS_DROPOUT:  # 1 / (1 - p) after the loop
        keep = _dropout_keep(seed, pid_bh, offs_m, start_n, k_len, dropout_p, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(
    Q, K, V, OUT, LSE, QSEG, KSEG, QSPAN, PREFIX, BIAS, QPOS, KPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_pb, stride_pm,
    n_heads, kv_group, q_len, k_len, scale, dropout_p, seed,
    MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block of one (batch, head): online softmax over the visible key blocks, the
    free tiles without mask arithmetic, then the masked ones (module docstring).

    Query head ``h`` reads KV head ``h // kv_group`` (grouped-query attention; 1: one KV head
    per query head)."""
    pid_m, pid_bh, b, h = _program_ids(q_len, n_heads, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < q_len
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + _head_offset(b, h, stride_qb, stride_qh) + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q_seg, prefix, q_pos = _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len, stride_pb,
                                          stride_pm, MODE, HAS_SEG, HAS_BIAS)
    qk_scale = scale * _LOG2E
    K += _head_offset(b, h // kv_group, stride_kb, stride_kh)
    V += _head_offset(b, h // kv_group, stride_vb, stride_vh)
    bias_row = BIAS + h * (2 * BIAS_RANGE + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_n, hi_n = _key_range(QSPAN, b, pid_m, offs_m, q_len, k_len, prefix, BLOCK_M, BLOCK_N,
                            MODE, HAS_SEG)
    free_n = lo_n  # keys [lo_n, free_n): free tiles, no mask; [free_n, hi_n): masked
    if not HAS_SEG:  # (with segment ids every tile is masked: the free loop is compiled out)
        free_n = _free_key_end(pid_m, offs_m, q_len, k_len, prefix, lo_n, hi_n, BLOCK_M,
                               BLOCK_N, MODE, HAS_SEG)
        for start_n in range(lo_n, free_n, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K, V, KSEG, KPOS, bias_row, start_n, offs_m, offs_d, d_valid,
                b, pid_bh, q_len, k_len, q_seg, prefix, q_pos, qk_scale, dropout_p, seed,
                stride_kn, stride_kd, stride_vn, stride_vd, MODE, HAS_SEG, HAS_BIAS,
                HAS_DROPOUT, BIAS_RANGE, BLOCK_M, BLOCK_N, DOT_PRECISION, MASKED=False)
    for start_n in range(free_n, hi_n, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K, V, KSEG, KPOS, bias_row, start_n, offs_m, offs_d, d_valid,
            b, pid_bh, q_len, k_len, q_seg, prefix, q_pos, qk_scale, dropout_p, seed,
            stride_kn, stride_kd, stride_vn, stride_vd, MODE, HAS_SEG, HAS_BIAS,
            HAS_DROPOUT, BIAS_RANGE, BLOCK_M, BLOCK_N, DOT_PRECISION, MASKED=True)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # log2 units
    tl.store(OUT + _head_offset(b, h, stride_ob, stride_oh) + offs_m[:, None] * stride_om
             + offs_d[None, :] * stride_od, acc.to(OUT.dtype.element_ty), mask=md_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=m_valid)

