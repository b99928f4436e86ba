"""A tiny model of each family memorises one fixed batch with AdamW and the study's loss."""

import pytest
import torch

from megarch.config.presets import get_model_preset
from megarch.model import build_model, lm_loss


def _decoder_batch(g):
    tokens = torch.randint(0, 512, (4, 16), generator=g)
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "loss_mask": (torch.arange(16) >= 5).float().expand(4, 16),
        "positions": torch.arange(16).expand(4, 16),
        "segment_ids": torch.ones(4, 16, dtype=torch.long),
        "prefix_len": torch.full((4,), 6),
    }


def _encoder_decoder_batch(g):
    return {
        "encoder_tokens": torch.randint(0, 512, (4, 12), generator=g),
        "decoder_tokens": torch.randint(0, 512, (4, 8), generator=g),
        "decoder_labels": torch.randint(0, 512, (4, 8), generator=g),
        "decoder_loss_mask": torch.ones(4, 8),
    }


@pytest.mark.parametrize("preset", ["nd_tiny", "ed_tiny"])
def test_tiny_model_overfits_one_batch(preset):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = get_model_preset(preset)
    model = build_model(cfg).train()
    batch = (_encoder_decoder_batch if cfg.is_encoder_decoder else _decoder_batch)(g)
    labels = batch.get("labels", batch.get("decoder_labels"))
    mask = batch.get("loss_mask", batch.get("decoder_loss_mask"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        out = lm_loss(model(**batch), labels, mask, cfg.z_loss)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["ce"].item())
    assert losses[-1] < 0.5 * losses[0], losses
