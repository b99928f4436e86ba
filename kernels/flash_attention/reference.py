"""Plain-PyTorch reference of ``flash_attention`` (same semantics, materialised scores).

The one reference: the kernel tests, the model's dispatch tests and the benchmark compare
against it, and ``bias_by_distance`` builds the kernels' bias from its T5 bucketing.
"""

from __future__ import annotations

import math

import torch

from .modes import BIDIRECTIONAL, CAUSAL, CROSS, PREFIX


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

    Computes in float32 (float64 inputs stay float64); returns q's dtype. k, v may have fewer
    heads than q (a divisor: grouped-query attention), repeated here for each group. Attention
    dropout takes its keep mask explicitly: ``dropout_mask`` bool [batch, heads, q_len, k_len]
    (the kernel's for a seed: module function ``dropout_mask``), kept probabilities scaled by
    1 / (1 - dropout_p).
    """
    mode = int(mode)
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    if k.shape[1] != heads:  # grouped-query attention: query head h reads KV head h // group
        k, v = (x.repeat_interleave(heads // k.shape[1], dim=1) for x in (k, v))
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
