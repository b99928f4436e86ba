"""Kernel-form inputs and the launches of the forward and backward kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .autotune import BlockConfig, _block_config
from .backward import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
from .dropout import _SEED_FLAG
from .forward import _fwd_kernel
from .modes import CROSS, PREFIX


@dataclass
class _MaskArgs:
    """Mask and bias inputs in kernel form (int32, contiguous), built once per call."""

    mode: int
    q_seg: torch.Tensor | None  # [batch, q_len]
    k_seg: torch.Tensor | None  # [batch, k_len]
    q_span: torch.Tensor | None  # [batch, q_len, 2]: keys [first, end) of each query's segment
    k_span: torch.Tensor | None  # [batch, k_len, 2]: queries [first, end) of each key's segment
    prefix: torch.Tensor | None  # [batch] or [batch, q_len]
    prefix_range: torch.Tensor | None  # [batch, 2]: each row's longest, shortest prefix
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
    rows = prefix.reshape(batch, -1)
    # [batch, 2]: the longest prefix bounds the skipped tiles, the shortest the free ones
    prefix_range = torch.stack((rows.amax(dim=1), rows.amin(dim=1)), dim=1).contiguous()
    return prefix, prefix_range


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs mean the caller asked for fp32 accuracy: 3xTF32 keeps it on tensor cores
    # ("ieee" falls back to FMA loops that spill kilobytes).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _common_args(q, k, v, do, mask: _MaskArgs):
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *mask.prefix_strides())
    return strides, (q.shape[1], q.shape[1] // k.shape[1], q.shape[2], k.shape[2], mask.scale,
                     mask.dropout_p, mask.dropout_seed)


def _constexprs(q: torch.Tensor, mask: _MaskArgs, config: BlockConfig, has_bias: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(MODE=mask.mode, HAS_SEG=mask.has_seg, HAS_BIAS=has_bias,
                HAS_DROPOUT=mask.dropout_p > 0.0, BIAS_RANGE=mask.bias_range, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=config.num_warps, num_stages=config.num_stages)


_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2: 65,535)


def _grid(length: int, block: int, batch_heads: int) -> tuple[int]:
    """The folded launch grid of a kernel over ``cdiv(length, block)`` blocks of each of
    ``batch_heads`` (batch, head) pairs: one axis (the kernels' ``_program_ids`` unfold it)."""
    programs = triton.cdiv(length, block) * batch_heads
    if programs > _MAX_GRID_X:
        raise ValueError(f"flash_attention: {programs} programs ({batch_heads} batch x heads, "
                         f"length {length}, blocks of {block}) exceed CUDA's grid limit "
                         f"{_MAX_GRID_X}; split the batch")
    return (programs,)


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
        _fwd_kernel[_grid(q_len, cfg.block_m, batch * heads)](
            q, k, v, out, lse, p(mask.q_seg), p(mask.k_seg), p(mask.q_span), p(mask.prefix),
            p(bias, torch.float32), p(mask.q_pos), p(mask.k_pos),
            *strides, *sizes, **_constexprs(q, mask, cfg, has_bias),
        )

    launch(_block_config("fwd", mask.fwd_config, q, k.shape[2], mask.mode, mask.has_seg,
                         has_bias, launch, has_dropout=mask.dropout_p > 0.0))
    return out, lse


def _preprocess_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_M) of the delta preprocess: <= 64 fp32 elements per thread of 4 warps."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_d, max(16, min(128, 8192 // block_d))


def _delta(out: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """``rowsum(dO o O)``: fp32 [batch, heads, q_len], by the preprocess kernel (any strides)."""
    batch, heads, q_len, head_dim = out.shape
    delta = _empty((batch, heads, q_len), torch.float32, out.device)
    block_d, block_m = _preprocess_blocks(head_dim)
    _bwd_preprocess_kernel[_grid(q_len, block_m, batch * heads)](
        out, do, delta, *out.stride(), *do.stride(), heads, q_len,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=4,
    )
    return delta


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
    delta = _delta(out, do)  # [batch, heads, q_len] fp32
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    dbias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
    p = _Pointers(q.device)
    strides, sizes = _common_args(q, k, v, do, mask)
    has_bias = bias is not None

    def launch_dkdv(cfg: BlockConfig) -> None:
        _bwd_dkdv_kernel[_grid(k_len, cfg.block_n, batch * k.shape[1])](
            q, k, v, do, lse, delta, dk, dv, p(mask.q_seg), p(mask.k_seg), p(mask.k_span),
            p(mask.prefix), p(mask.prefix_range), p(bias, torch.float32), p(mask.q_pos),
            p(mask.k_pos), *strides, *sizes, **_constexprs(q, mask, cfg, has_bias),
        )

    def launch_dq(cfg: BlockConfig) -> None:
        if dbias is not None:
            dbias.zero_()  # accumulated with atomics: every (tuning) launch starts from zero
        _bwd_dq_kernel[_grid(q_len, cfg.block_m, batch * heads)](
            q, k, v, do, lse, delta, dq, p(dbias, torch.float32), p(mask.q_seg),
            p(mask.k_seg), p(mask.q_span), p(mask.prefix), p(bias, torch.float32),
            p(mask.q_pos), p(mask.k_pos), *strides, *sizes, **_constexprs(q, mask, cfg, has_bias),
        )

    for kernel, explicit, launch in (("dkdv", mask.dkdv_config, launch_dkdv),
                                     ("dq", mask.dq_config, launch_dq)):
        launch(_block_config(kernel, explicit, q, k_len, mask.mode, mask.has_seg, has_bias,
                             launch, has_dropout=mask.dropout_p > 0.0))
    return dq, dk, dv, dbias



def _default_positions(positions, batch, length, device, name) -> torch.Tensor:
    if positions is None:
        return torch.arange(length, dtype=torch.int32, device=device).expand(batch, -1).contiguous()
    return _int_rows(name, positions, batch, length, device)

