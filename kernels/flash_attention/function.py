"""The autograd Function and the public ``flash_attention``: checks inputs, builds the
kernel-form masks and bias, and launches (launcher.py)."""

from __future__ import annotations

import torch

from .autotune import BlockConfig
from .bias import bias_by_distance, bias_range
from .dropout import _dropout_args
from .launcher import (
    _backward,
    _default_positions,
    _forward,
    _MaskArgs,
    _prefix,
    _segment_spans,
    _segments,
)
from .masks import _interpreting
from .modes import BIDIRECTIONAL, CROSS, MODE_NAMES


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



def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: int) -> None:
    if mode not in MODE_NAMES:
        raise ValueError(f"mode must be one of {MODE_NAMES} (CAUSAL=0 ... CROSS=3), got {mode}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, len, head_dim], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (batch and head_dim must agree, k and v match)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads and k, v {k.shape[1]}: the KV heads must "
                         "divide the query heads (grouped-query attention: query head h reads "
                         "KV head h // (heads // kv_heads))")
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
        q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, k_len, head_dim], kv_heads
            dividing heads (grouped-query / multi-query attention: query head h reads KV head
            h // (heads // kv_heads); dK / dV are summed over each group); one dtype of
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
    prefix, prefix_range = _prefix(mode, prefix_len, batch, q_len, device)
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
    mask = _MaskArgs(mode, q_seg, k_seg, q_span, k_span, prefix, prefix_range, q_pos, k_pos, r,
                     head_dim ** -0.5 if scale is None else float(scale),
                     fwd_config, dkdv_config, dq_config,
                     *_dropout_args(dropout_p, dropout_seed, q_len, k_len))
    return FlashAttentionFunction.apply(q, k, v, bias, mask)

