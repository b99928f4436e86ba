"""lm_loss against a manual cross-entropy and z-loss."""

import math

import torch

from megarch.model.loss import lm_loss


def _manual(logits, labels, mask):
    ce_sum = z_sum = count = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b][t] == 0:
                continue
            row = [float(x) for x in logits[b, t]]
            log_z = math.log(sum(math.exp(x) for x in row))
            ce_sum += log_z - row[labels[b][t]]
            z_sum += log_z**2
            count += 1
    return ce_sum / count, z_sum / count, count


def test_ce_and_z_loss_match_manual_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7) * 3
    labels = [[1, 6, 0, -100], [3, 3, 2, 5]]  # -100 sits under a zero mask
    mask = [[1, 1, 0, 0], [1, 0, 1, 1]]
    out = lm_loss(logits, torch.tensor(labels), torch.tensor(mask, dtype=torch.float32), 1e-2)
    ce, z, count = _manual(logits, labels, mask)
    assert abs(out["ce"].item() - ce) < 1e-5
    assert abs(out["z_loss"].item() - z) < 1e-4
    assert abs(out["loss"].item() - (ce + 1e-2 * z)) < 1e-5
    assert out["tokens"].item() == count == 5


def test_gradient_flows_only_from_counted_tokens_and_global_normaliser():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    out = lm_loss(logits, labels, mask, 1e-4)
    out["loss"].backward()
    assert torch.equal(logits.grad[0, 1], torch.zeros(5))
    half = lm_loss(logits, labels, mask, 1e-4, num_tokens=4)
    assert torch.allclose(half["ce"], out["ce"] / 2)


def test_empty_mask_gives_zero_not_nan():
    out = lm_loss(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    assert out["loss"].item() == 0.0 and out["tokens"].item() == 0
