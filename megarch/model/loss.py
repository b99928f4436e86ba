"""The training loss: cross-entropy over loss-masked tokens plus T5X's z-loss.

    ce     = sum_t m_t * (logsumexp(z_t) - z_t[y_t]) / sum_t m_t
    z_loss = sum_t m_t * logsumexp(z_t)^2            / sum_t m_t
    loss   = ce + z_loss_coef * z_loss

with logits z, labels y and loss mask m (PAPER.md: z-loss 1e-4). The z-loss keeps the softmax
normaliser near 1 (log Z near 0), which stabilises bfloat16 training of large vocabularies.
"""

from __future__ import annotations

import torch

from megarch.parallel.collectives import (
    Group,
    all_reduce_max,
    group_rank,
    group_size,
    reduce_from_tp,
)


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    z_loss_coef: float = 1e-4,
    num_tokens: float | torch.Tensor | None = None,
    tp_group: Group = None,
) -> dict[str, torch.Tensor]:
    """Masked mean cross-entropy and z-loss of ``logits`` [batch, len, vocab].

    Args:
        logits: [batch, len, vocab], any float dtype (computed in float32).
        labels: [batch, len] int64 target ids (any value where the mask is 0).
        loss_mask: [batch, len], 1 where the token counts (float or bool).
        z_loss_coef: weight of the z-loss term.
        num_tokens: divide the sums by this instead of this batch's mask sum: pass the loss-token
            count of the whole global batch when accumulating micro-batches or averaging over
            data-parallel ranks, so every token weighs the same.
        tp_group: a tensor-parallel group: ``logits`` is then this rank's vocab shard
            [batch, len, vocab / tp] (rank r holds ids [r * V/tp, (r + 1) * V/tp)) and the
            log-normaliser and target logits are reduced across the group (vocab-parallel
            cross-entropy); every rank gets the same, replicated, loss.

    Returns a dict of scalars: ``loss`` (ce + z_loss_coef * z_loss, the one to backpropagate),
    ``ce``, ``z_loss`` (unweighted) and ``tokens`` (this batch's mask sum). With no counted token
    the means are 0 (the sums are divided by max(tokens, 1)).
    """
    vocab = logits.shape[-1]
    logits32 = logits.float().reshape(-1, vocab)  # [batch * len, vocab]
    mask = loss_mask.reshape(-1).to(logits32.dtype)  # [batch * len]
    targets = labels.reshape(-1).masked_fill(mask == 0, 0)  # keep ignored labels in range
    if group_size(tp_group) > 1:
        log_z, ce = _vocab_parallel_ce(logits32, targets, tp_group)
    else:
        # one vocab-sized pass: ce = log Z - z_y (cross_entropy would redo the normaliser)
        log_z = torch.logsumexp(logits32, dim=-1)  # [batch * len]
        ce = log_z - logits32.gather(1, targets[:, None]).squeeze(1)  # [batch * len]
    tokens = mask.sum()
    denom = tokens.clamp(min=1.0) if num_tokens is None else torch.as_tensor(
        num_tokens, dtype=logits32.dtype, device=logits32.device
    )
    ce_mean = (ce * mask).sum() / denom
    z_mean = (log_z.square() * mask).sum() / denom
    return {
        "loss": ce_mean + z_loss_coef * z_mean,
        "ce": ce_mean,
        "z_loss": z_mean,
        "tokens": tokens,
    }


def _vocab_parallel_ce(
    logits: torch.Tensor, targets: torch.Tensor, group: Group
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z, cross-entropy), each [tokens], from a vocab shard ``logits`` [tokens, vocab/tp]."""
    shard = logits.shape[-1]
    start = group_rank(group) * shard
    peak = all_reduce_max(logits.max(dim=-1).values, group)  # [tokens], no gradient
    sum_exp = reduce_from_tp((logits - peak[:, None]).exp().sum(dim=-1), group)  # [tokens]
    log_z = peak + sum_exp.log()
    local = targets - start
    mine = (local >= 0) & (local < shard)
    picked = logits.gather(1, local.clamp(0, shard - 1)[:, None]).squeeze(1)  # [tokens]
    target_logit = reduce_from_tp(picked.masked_fill(~mine, 0.0), group)
    return log_z, log_z - target_logit
