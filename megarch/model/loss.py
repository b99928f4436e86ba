"""The training loss: cross-entropy over loss-masked tokens plus T5X's z-loss.

    ce     = sum_t m_t * (logsumexp(z_t) - z_t[y_t]) / sum_t m_t
    z_loss = sum_t m_t * logsumexp(z_t)^2            / sum_t m_t
    loss   = ce + z_loss_coef * z_loss

with logits z, labels y and loss mask m (PAPER.md: z-loss 1e-4). The z-loss keeps the softmax
normaliser near 1 (log Z near 0), which stabilises bfloat16 training of large vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    z_loss_coef: float = 1e-4,
    num_tokens: float | torch.Tensor | None = None,
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

    Returns a dict of scalars: ``loss`` (ce + z_loss_coef * z_loss, the one to backpropagate),
    ``ce``, ``z_loss`` (unweighted) and ``tokens`` (this batch's mask sum). With no counted token
    the means are 0 (the sums are divided by max(tokens, 1)).
    """
    vocab = logits.shape[-1]
    logits32 = logits.float().reshape(-1, vocab)  # [batch * len, vocab]
    mask = loss_mask.reshape(-1).to(logits32.dtype)  # [batch * len]
    targets = labels.reshape(-1).masked_fill(mask == 0, 0)  # keep ignored labels in range
    log_z = torch.logsumexp(logits32, dim=-1)  # [batch * len]
    ce = F.cross_entropy(logits32, targets, reduction="none")  # [batch * len]
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
