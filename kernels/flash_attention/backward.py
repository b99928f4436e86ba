"""The backward kernels (FlashAttention-2): the ``delta`` preprocess, dK/dV over key blocks,
dQ over query blocks.

Both main kernels recompute the probabilities from the forward's log-sum-exp. Matmuls per
(query tile, key tile): dK/dV recomputes S = Q K^T and dP = dO V^T and adds dV += P^T dO and
dK += dS^T Q (4); dQ recomputes S and dP again and adds dQ += dS K (3): 7, against 5 for
FlashAttention-2's single kernel, which accumulates dQ with fp32 atomics into a
[batch, heads, q_len, head_dim] buffer. The split costs 2 / 5 more backward matmul FLOPs and
buys a deterministic dQ written once in the inputs' dtype, no fp32 dQ buffer and no atomic
traffic, and each kernel its own tiles (dK/dV long key blocks, dQ long query blocks). Which is
faster is a GPU measurement (tools/gpu_check.sh); until one says otherwise we keep the split.

Each main loop is split like the forward's (forward.py): free tiles, fully visible and in
bounds, run the tile body (``_dkdv_tile``, ``_dq_tile``) with ``MASKED`` False, without
visibility or bounds arithmetic; the others with the mask. Both kernels run their masked
tiles first (the masked tiles' extra inputs are then dead in the free loop: the other order
spilled): dQ the masked key tiles, then the free run from key 0 (``masks._free_key_end``);
dK/dV the masked query blocks (below the free run, and the partial last one above it), then
the free run (``masks._free_query_range``). dK/dV thus sums in the same order, with the same
bits, as before the split when q_len is a multiple of BLOCK_M and one query head reads each
KV head; otherwise dK / dV, and dQ and the bias gradient, differ by fp32 rounding only (with
a group, each dK/dV loop walks the whole group).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .bias import _add_bias_grad, _position_run, _tile_bias
from .dropout import _dropout_keep
from .masks import (
    _free_key_end,
    _free_query_range,
    _head_offset,
    _key_range,
    _load_col_info,
    _load_row_info,
    _program_ids,
    _query_range,
    _tile_visible,
)
from .modes import _LOG2E


@triton.jit
def _bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``delta = rowsum(dO o O)`` of one query block of one (batch, head), in fp32 (FA2's
    preprocess: one read of O and dO, no full-size fp32 temporaries). DELTA is contiguous
    [batch, heads, q_len]."""
    pid_m, pid_bh, b, h = _program_ids(q_len, n_heads, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    md_mask = m_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + _head_offset(b, h, stride_ob, stride_oh) + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=md_mask, other=0.0)
    do = tl.load(DO + _head_offset(b, h, stride_dob, stride_doh) + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, delta, mask=m_valid)


@triton.jit
def _recompute_probs(q, k, lse, qk_scale, bias_row, q_pos, k_pos, visible,
                     HAS_BIAS: tl.constexpr, BIAS_RANGE: tl.constexpr, MASKED: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """The tile's probabilities P = exp2(S - lse) recomputed from q [M, D] and k [N, D] (the
    bias added; a masked tile zeroes what is not ``visible``) and the bias's distance indices
    (0 without bias): the start both backward tiles share."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    idx = 0  # (a placeholder without bias: None does not compile as a return value)
    if HAS_BIAS:
        bias, idx = _tile_bias(bias_row, q_pos, k_pos, visible, BIAS_RANGE, MASKED)
        s += bias
    if MASKED:
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
    else:
        p = tl.exp2(s - lse[:, None])
    return p, idx


@triton.jit
def _dkdv_tile(dk, dv, k, v, k_seg, k_pos, it, start_m, n_blocks_m, skip_from, skip, h_kv,
               b, pid_n, offs_n, offs_d, d_valid, Q, DO, LSE, DELTA, QSEG, PREFIX, BIAS, QPOS,
               stride_qb, stride_qh, stride_qm, stride_qd,
               stride_dob, stride_doh, stride_dom, stride_dod, stride_pb, stride_pm,
               n_heads, kv_group, q_len, k_len, qk_scale, dropout_p, seed,
               MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, BIAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Step ``it`` of a loop over (query head of the group, query block): the updated (dk, dv).
    The loop's ``n_blocks_m`` query blocks run from ``start_m`` up, jumping over the ``skip``
    queries from ``skip_from`` (the masked loop over the free run).

    ``MASKED`` False: a free tile (every element in bounds and visible), so no visibility and
    no query-bounds masks; bias and dropout as masked.
    """
    h = h_kv * kv_group + it // n_blocks_m  # a query head of this KV head's group
    block_m = start_m + (it % n_blocks_m) * BLOCK_M
    block_m += tl.where(block_m >= skip_from, skip, 0)
    pid_bh = b * n_heads + h
    q_head = Q + _head_offset(b, h, stride_qb, stride_qh)
    do_head = DO + _head_offset(b, h, stride_dob, stride_doh)
    lse_head = LSE + pid_bh.to(tl.int64) * q_len  # LSE / DELTA: [batch, heads, q_len]
    delta_head = DELTA + pid_bh.to(tl.int64) * q_len
    bias_row = BIAS + h * (2 * BIAS_RANGE + 1)
    offs_m = block_m + tl.arange(0, BLOCK_M)
    q_ptrs = q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = do_head + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    if MASKED:
        m_valid = offs_m < q_len
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_ptrs, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(do_ptrs, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        lse = tl.load(lse_head + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(delta_head + offs_m, mask=m_valid, other=0.0)
        q_seg, prefix, q_pos = _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len,
                                              stride_pb, stride_pm, MODE, HAS_SEG, HAS_BIAS)
        visible = _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix, MODE,
                                HAS_SEG)
    else:
        q = tl.load(q_ptrs, mask=d_valid[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=d_valid[None, :], other=0.0)
        lse = tl.load(lse_head + offs_m)
        delta = tl.load(delta_head + offs_m)
        visible = None
        q_pos = None
        if HAS_BIAS:
            q_pos = tl.load(QPOS + b * q_len + offs_m)
    p, _ = _recompute_probs(q, k, lse, qk_scale, bias_row, q_pos, k_pos, visible, HAS_BIAS,
                            BIAS_RANGE, MASKED, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
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
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QSEG, KSEG, KSPAN, PREFIX, PREFIX_RANGE, BIAS, QPOS, KPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_pb, stride_pm,
    n_heads, kv_group, q_len, k_len, scale, dropout_p, seed,
    MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of one (batch, KV head): dK and dV summed over the query blocks that see
    it, of every query head of its group (``kv_group`` query heads share one KV head: the sum
    stays in registers, no atomics and no per-query-head buffer). Free query blocks run
    without mask arithmetic (module docstring).

    DK / DV are contiguous [batch, kv_heads, k_len, head_dim].
    """
    pid_n, pid_bkv, b, h_kv = _program_ids(k_len, n_heads // kv_group, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    n_valid = offs_n < k_len
    nd_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + _head_offset(b, h_kv, stride_kb, stride_kh) + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + _head_offset(b, h_kv, stride_vb, stride_vh) + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    k_seg, k_pos = _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG, HAS_BIAS)
    qk_scale = scale * _LOG2E

    lo_m, hi_m = _query_range(KSPAN, PREFIX_RANGE, b, pid_n, offs_n, q_len, k_len, BLOCK_M,
                              BLOCK_N, MODE, HAS_SEG)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks [free_lo, free_hi) are free, the others of [lo_m, hi_m) masked (below the
    # free run, and at most the partial last block above it): one masked loop over both (a
    # third loop spilled: 40 B in the causal fp16 d64 variant on sm_80), then the free one.
    # Each is one loop over (query head of the group, query block): a nested loop over the
    # group spilled 72 B in the d128 prefix + segments + bias variant on sm_90.
    free_lo = hi_m  # with segment ids every tile is masked (the free loop is compiled out)
    free_hi = hi_m
    if not HAS_SEG:
        free_lo, free_hi = _free_query_range(PREFIX_RANGE, b, pid_n, q_len, k_len, lo_m, hi_m,
                                             BLOCK_M, BLOCK_N, MODE, HAS_SEG)
    n_masked = tl.cdiv(free_lo - lo_m, BLOCK_M) + tl.cdiv(hi_m - free_hi, BLOCK_M)
    for it in range(0, kv_group * n_masked):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, k_seg, k_pos, it, lo_m, n_masked, free_lo, free_hi - free_lo, h_kv,
            b, pid_n, offs_n, offs_d, d_valid, Q, DO, LSE, DELTA, QSEG, PREFIX, BIAS, QPOS,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom,
            stride_dod, stride_pb, stride_pm, n_heads, kv_group, q_len, k_len, qk_scale,
            dropout_p, seed, MODE, HAS_SEG, HAS_BIAS, HAS_DROPOUT, BIAS_RANGE, BLOCK_M,
            BLOCK_N, DOT_PRECISION, MASKED=True)
    if not HAS_SEG:
        n_free = (free_hi - free_lo) // BLOCK_M
        for it in range(0, kv_group * n_free):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, k_seg, k_pos, it, free_lo, n_free, hi_m, 0, h_kv, b, pid_n,
                offs_n, offs_d, d_valid, Q, DO, LSE, DELTA, QSEG, PREFIX, BIAS, QPOS,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh,
                stride_dom, stride_dod, stride_pb, stride_pm, n_heads, kv_group, q_len,
                k_len, qk_scale, dropout_p, seed, MODE, HAS_SEG, HAS_BIAS, HAS_DROPOUT,
                BIAS_RANGE, BLOCK_M, BLOCK_N, DOT_PRECISION, MASKED=False)

    out_offs = (pid_bkv.to(tl.int64) * k_len * HEAD_DIM + offs_n[:, None] * HEAD_DIM
                + offs_d[None, :])
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    if HAS_DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, KSEG, KPOS, bias_row, dbias_row, start_n, offs_m,
             offs_d, d_valid, b, pid_m, pid_bh, q_len, k_len, q_seg, prefix, q_pos, q_run,
             q_shift, qk_scale, dropout_p, seed, stride_kn, stride_kd, stride_vn, stride_vd,
             MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, BIAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Key tile ``start_n`` of a query block: the updated dq (and the tile's bias gradient
    added). ``MASKED`` False: a free tile (every element in bounds and visible), so no
    visibility and no key-bounds masks; bias, its gradient and dropout as masked.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < k_len  # [BLOCK_N] (the bias gradient's position run needs it)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BLOCK_N, BLOCK_D]
    v_ptrs = V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # [BLOCK_D, BLOCK_N]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        v_t = tl.load(v_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        k_seg, k_pos = _load_col_info(KSEG, KPOS, b, offs_n, k_len, HAS_SEG, HAS_BIAS)
        visible = _tile_visible(offs_m, offs_n, q_len, k_len, q_seg, k_seg, prefix, MODE, HAS_SEG)
    else:
        k = tl.load(k_ptrs, mask=d_valid[None, :], other=0.0)
        v_t = tl.load(v_ptrs, mask=d_valid[:, None], other=0.0)
        visible = None  # (no mask on the bias gradient's per-element atomics)
        k_pos = None
        if HAS_BIAS:
            k_pos = tl.load(KPOS + b * k_len + offs_n)
    p, idx = _recompute_probs(q, k, lse, qk_scale, bias_row, q_pos, k_pos, visible, HAS_BIAS,
                              BIAS_RANGE, MASKED, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_DROPOUT:  # dP = Z o (dO V^T) (the _backward docstring)
        keep = _dropout_keep(seed, pid_bh, offs_m, start_n, k_len, dropout_p, BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        _add_bias_grad(dbias_row, ds, idx, visible, q_run, q_shift, k_pos, offs_n, n_valid,
                       pid_m * BLOCK_M, start_n, BIAS_RANGE, BLOCK_M, BLOCK_N)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DBIAS, QSEG, KSEG, QSPAN, PREFIX, BIAS, QPOS, KPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_pb, stride_pm,
    n_heads, kv_group, q_len, k_len, scale, dropout_p, seed,
    MODE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block of one (batch, head): dQ (from KV head ``h // kv_group``), and the bias
    gradient added atomically after a reduction inside each tile (``_add_bias_grad``). Free
    key tiles run without mask arithmetic (module docstring).

    DQ is contiguous [batch, heads, q_len, head_dim]; DBIAS is fp32 [heads, 2 R + 1].
    """
    pid_m, pid_bh, b, h = _program_ids(q_len, n_heads, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < q_len
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + _head_offset(b, h, stride_qb, stride_qh) + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + _head_offset(b, h, stride_dob, stride_doh) + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_valid, other=0.0)
    q_seg, prefix, q_pos = _load_row_info(QSEG, PREFIX, QPOS, b, offs_m, q_len, stride_pb,
                                          stride_pm, MODE, HAS_SEG, HAS_BIAS)
    qk_scale = scale * _LOG2E
    K += _head_offset(b, h // kv_group, stride_kb, stride_kh)
    V += _head_offset(b, h // kv_group, stride_vb, stride_vh)
    bias_row = BIAS + h * (2 * BIAS_RANGE + 1)
    dbias_row = DBIAS + h * (2 * BIAS_RANGE + 1)
    q_run, q_shift = _position_run(q_pos, offs_m, m_valid)  # for the bias gradient

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_n, hi_n = _key_range(QSPAN, b, pid_m, offs_m, q_len, k_len, prefix, BLOCK_M, BLOCK_N,
                            MODE, HAS_SEG)
    # Keys [free_n, hi_n) masked first, then the free tiles [lo_n, free_n): the other order
    # keeps the masked tiles' per-row inputs live through the free loop and spilled (16-28 B
    # in the d64 fp16 variants with bias on sm_90).
    free_n = lo_n  # with segment ids every tile is masked (the free loop is compiled out)
    if not HAS_SEG:
        free_n = _free_key_end(pid_m, offs_m, q_len, k_len, prefix, lo_n, hi_n, BLOCK_M,
                               BLOCK_N, MODE, HAS_SEG)
    for start_n in range(free_n, hi_n, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse, delta, K, V, KSEG, KPOS, bias_row, dbias_row, start_n, offs_m,
            offs_d, d_valid, b, pid_m, pid_bh, q_len, k_len, q_seg, prefix, q_pos, q_run,
            q_shift, qk_scale, dropout_p, seed, stride_kn, stride_kd, stride_vn, stride_vd,
            MODE, HAS_SEG, HAS_BIAS, HAS_DROPOUT, BIAS_RANGE, BLOCK_M, BLOCK_N, DOT_PRECISION,
            MASKED=True)
    if not HAS_SEG:
        for start_n in range(lo_n, free_n, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse, delta, K, V, KSEG, KPOS, bias_row, dbias_row, start_n, offs_m,
                offs_d, d_valid, b, pid_m, pid_bh, q_len, k_len, q_seg, prefix, q_pos, q_run,
                q_shift, qk_scale, dropout_p, seed, stride_kn, stride_kd, stride_vn,
                stride_vd, MODE, HAS_SEG, HAS_BIAS, HAS_DROPOUT, BIAS_RANGE, BLOCK_M, BLOCK_N,
                DOT_PRECISION, MASKED=False)

    out_offs = (pid_bh.to(tl.int64) * q_len * HEAD_DIM + offs_m[:, None] * HEAD_DIM
                + offs_d[None, :])
    tl.store(DQ + out_offs, (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)

