"""Tiny models and batches shared by the distributed tests (importable by spawned ranks)."""

from __future__ import annotations

import torch

from megarch.config.model import ModelConfig

ARCHS = ("causal_decoder", "nonc_decoder", "encoder_decoder")


def tiny_config(arch: str) -> ModelConfig:
    """A model small enough to train several steps in milliseconds, every dim TP-divisible."""
    return ModelConfig(arch=arch, vocab_size=96, d_model=32, n_heads=4, head_dim=8, d_ff=48,
                       n_layers=2, n_decoder_layers=2 if arch == "encoder_decoder" else None,
                       rel_buckets=8, rel_max_distance=16, z_loss=1e-2)


def tiny_batch(arch: str, seed: int, batch: int = 4, length: int = 12) -> dict:
    """A random batch with packing (two segments, padding) and a partial loss mask."""
    gen = torch.Generator().manual_seed(seed)
    segments = torch.ones(batch, length, dtype=torch.long)
    segments[:, length // 2:] = 2
    segments[0, -3:] = 0  # padding
    positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])
    positions = positions.expand(batch, length).clone()
    tokens = torch.randint(0, 96, (batch, length), generator=gen)
    labels = torch.randint(0, 96, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) < 0.8).float() * (segments > 0)
    if arch == "encoder_decoder":
        enc = torch.randint(0, 96, (batch, length), generator=gen)
        return {"encoder_tokens": enc, "encoder_positions": positions,
                "encoder_segment_ids": segments, "decoder_tokens": tokens,
                "decoder_positions": positions, "decoder_segment_ids": segments,
                "decoder_labels": labels, "decoder_loss_mask": mask}
    return {"tokens": tokens, "positions": positions, "segment_ids": segments,
            "prefix_len": torch.full((batch, length), 3), "labels": labels, "loss_mask": mask}


def labels_and_mask(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, loss mask) of a decoder-only or encoder-decoder batch."""
    if "decoder_labels" in batch:
        return batch["decoder_labels"], batch["decoder_loss_mask"]
    return batch["labels"], batch["loss_mask"]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()
