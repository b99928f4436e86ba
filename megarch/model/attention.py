"""One attention function for every mask the study needs, named as the samples name them.

Mask semantics (the contract with megarch.data.samples, and with the attention kernel):

- ``segment_ids`` [batch, len]: 1, 2, ... per packed segment, 0 = padding. Attention never
  crosses segments, and a padding key (segment 0) is visible to no query. A padding query
  therefore sees nothing; its output is exactly zero (no NaN, forward or backward).
- ``CAUSAL``: key j is visible from query i iff same segment and ``j <= i``.
- ``PREFIX``: same segment and (``j <= i`` or ``j < prefix_len[i]``). ``prefix_len`` is [batch]
  (one prefix per row) or [batch, len] (one value per query position, for packed rows), in row
  positions; 0 gives the causal mask.
- ``BIDIRECTIONAL``: same segment.
- ``CROSS``: decoder query i sees encoder key j iff ``q_segment_ids[i] == k_segment_ids[j]``
  (and the key is not padding).

Omitted segment ids mean one segment with no padding. Tensors are laid out
``[batch, heads, len, head_dim]``.
"""

from __future__ import annotations

import enum
import os

import torch

from megarch.model.position import RelativeBias
from megarch.parallel.collectives import Group, group_rank, group_size
from megarch.parallel.rng import global_draw, rank_seed, split_dropout

ATTENTION_ENV = "MEGARCH_ATTENTION"
"""``reference`` forces the PyTorch path everywhere; ``kernel`` also uses the Triton kernel on
CPU (under ``TRITON_INTERPRET=1``, for tests); unset: the kernel on CUDA, the reference on CPU."""


class MaskMode(enum.IntEnum):
    """Which keys a query may see (integers so a kernel can take them as a compile-time mode)."""

    CAUSAL = 0
    PREFIX = 1
    BIDIRECTIONAL = 2
    CROSS = 3


def build_mask(
    mode: MaskMode,
    q_len: int,
    k_len: int,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The boolean visibility mask ``[batch or 1, q_len, k_len]`` (True = key visible).

    For the self-attention modes ``k_segment_ids`` defaults to ``q_segment_ids`` and
    ``q_len == k_len``. See the module docstring for the rules.
    """
    mode = MaskMode(mode)
    if mode != MaskMode.CROSS:
        if q_len != k_len:
            raise ValueError(f"{mode.name} self-attention needs q_len == k_len, got {q_len}, "
                             f"{k_len}")
        if k_segment_ids is None:
            k_segment_ids = q_segment_ids
    if q_segment_ids is not None:
        device = q_segment_ids.device
    elif k_segment_ids is not None:
        device = k_segment_ids.device
    q_idx = torch.arange(q_len, device=device)[:, None]  # [q_len, 1]
    k_idx = torch.arange(k_len, device=device)[None, :]  # [1, k_len]
    mask = torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)  # [1, q_len, k_len]
    if mode == MaskMode.CAUSAL:
        mask = mask & (k_idx <= q_idx)
    elif mode == MaskMode.PREFIX:
        if prefix_len is None:
            raise ValueError("MaskMode.PREFIX needs prefix_len ([batch] or [batch, q_len])")
        prefix = prefix_len.to(device)
        prefix = prefix.reshape(-1, 1) if prefix.dim() <= 1 else prefix  # [batch, 1 or q_len]
        mask = mask & ((k_idx <= q_idx) | (k_idx < prefix[:, :, None]))  # [batch, q, k]
    if k_segment_ids is not None:
        mask = mask & (k_segment_ids != 0)[:, None, :]  # padding keys: [batch, 1, k_len]
        if q_segment_ids is not None:
            mask = mask & (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])
    elif q_segment_ids is not None:
        mask = mask & (q_segment_ids != 0)[:, :, None]  # padding queries see nothing
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: MaskMode,
    *,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    bias: torch.Tensor | RelativeBias | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_group: Group = None,
) -> torch.Tensor:
    """Masked multi-head attention: softmax(q k^T * scale + bias, masked) v.

    Args:
        q: [batch, heads, q_len, head_dim].
        k, v: [batch, kv_heads, k_len, head_dim]; ``kv_heads`` divides ``heads`` (grouped-query
            attention: query head h reads KV head ``h // (heads / kv_heads)``). The kernel
            reads the shared heads in place; the reference path repeats them.
        mode: the mask rule (module docstring).
        q_segment_ids, k_segment_ids: [batch, q_len] / [batch, k_len]; 0 = padding.
        prefix_len: PREFIX only: [batch] or [batch, q_len].
        bias: additive, broadcastable to [batch, heads, q_len, k_len], or a T5
            :class:`RelativeBias` (table + positions), which the kernel computes in place.
        scale: logit scale, default ``head_dim ** -0.5``.
        dropout_p: dropout on the attention probabilities (apply only while training); the
            kernel draws it in place from a seed (:func:`kernel_dropout_seed`), the reference
            path with a materialised mask.
        dropout_group: the tensor-parallel group the heads are split over: each rank draws
            its own masks (megarch.parallel.rng); None: the global torch generator.

    Returns [batch, heads, q_len, head_dim] in q's dtype; rows with no visible key are zero.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # ---- Kernel dispatch point: the Triton kernel (kernels/, same MaskMode integers) on CUDA ---
    if _use_kernel(q, bias):
        return _kernel_attention(q, k, v, mode, q_segment_ids, k_segment_ids, prefix_len, bias,
                                 scale, dropout_p, dropout_group)
    if isinstance(bias, RelativeBias):
        bias = bias.dense()
    mask = build_mask(mode, q.shape[-2], k.shape[-2], q_segment_ids, k_segment_ids, prefix_len,
                      device=q.device)
    return attention_reference(q, k, v, mask[:, None], bias=bias, scale=scale,
                               dropout_p=dropout_p, dropout_group=dropout_group)


def _use_kernel(q: torch.Tensor, bias) -> bool:
    """Whether the fused kernel serves this call (see :data:`ATTENTION_ENV`). It takes
    biases only as a :class:`RelativeBias`; attention dropout it does itself."""
    choice = os.environ.get(ATTENTION_ENV, "")
    if choice == "reference":
        return False
    if bias is not None and not isinstance(bias, RelativeBias):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.shape[-1] > 256:
        return False
    return q.is_cuda or choice == "kernel"


def kernel_dropout_seed(group: Group = None) -> int:
    """The attention kernel's dropout seed for one call (its masks: kernels.flash_attention
    ``dropout_mask``).

    One draw from the global CPU generator, as :func:`megarch.parallel.rng.split_dropout`
    draws: no device synchronisation; reproducible from the run seed; rewound by activation
    checkpointing with the generator, so a recomputed forward draws the first one's masks.
    Under a TP group of more than one rank (heads split) it is made per rank by
    :func:`~megarch.parallel.rng.rank_seed`, like the split activations' streams.
    """
    base = global_draw()
    if group_size(group) == 1:
        return base
    return rank_seed(base, group_rank(group))


def _kernel_attention(q, k, v, mode, q_segment_ids, k_segment_ids, prefix_len, bias, scale,
                      dropout_p=0.0, dropout_group=None):
    """The fused Triton kernel's output for the same arguments as :func:`attention`."""
    from kernels.flash_attention import flash_attention

    extra = {}
    if dropout_p > 0.0:
        extra = {"dropout_p": dropout_p, "dropout_seed": kernel_dropout_seed(dropout_group)}
    if bias is not None:
        table = bias.module
        extra |= {"rel_bias_table": table.table, "q_positions": bias.q_positions,
                 "k_positions": bias.k_positions, "bidirectional_buckets": table.bidirectional,
                 "num_buckets": table.n_buckets, "max_distance": table.max_distance}
    return flash_attention(q, k, v, int(mode), q_segment_ids=q_segment_ids,
                           k_segment_ids=k_segment_ids, prefix_len=prefix_len, scale=scale,
                           **extra)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float,
    dropout_p: float = 0.0,
    dropout_group: Group = None,
) -> torch.Tensor:
    """Plain PyTorch attention with an explicit boolean ``mask`` [batch or 1, 1, q_len, k_len].

    ``k``, ``v`` may have fewer heads than ``q`` (a divisor: grouped-query attention); each is
    repeated for its group of consecutive query heads first. Scores and softmax run in float32
    (float64 inputs stay float64). Fully masked rows give zeros, and zero gradients, instead
    of NaN.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # [batch, heads, k_len, hd]
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [b,h,q,k]
    if bias is not None:
        scores = scores + bias.to(compute)
    visible_row = mask.any(dim=-1, keepdim=True)  # [batch, 1, q_len, 1]
    # -inf on hidden keys; rows with nothing visible get 0 scores, then 0 probabilities.
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~visible_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible_row, 0.0)  # [b, h, q, k]
    if dropout_p > 0.0:
        probs = split_dropout(probs, dropout_p, dropout_group)  # heads split under TP
    out = torch.matmul(probs, v.to(compute))  # [batch, heads, q_len, head_dim]
    return out.to(q.dtype)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys or values [batch, kv_heads, len, head_dim] repeated to ``heads`` query heads (query
    head h reads KV head ``h // (heads / kv_heads)``); ``x`` itself when kv_heads == heads."""
    kv_heads = x.shape[1]
    if kv_heads == heads:
        return x
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
    return x.repeat_interleave(heads // kv_heads, dim=1)
