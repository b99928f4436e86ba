"""Position information: T5 relative position bias (the study's) and rotary (an option).

Both read ``positions`` [batch, len], the position of each token within its own segment, as
the samples carry them, so packed segments get the same relative distances as unpacked ones.

T5 bias: the distance ``k_pos - q_pos`` is mapped to one of ``n_buckets`` buckets (exact for
short distances, logarithmic up to ``max_distance``, then saturating) and each bucket holds a
learned scalar per head, added to the attention logits.

- Bidirectional bucketing (encoders): half the buckets for keys before the query, half for
  keys after it.
- Causal (unidirectional) bucketing: all buckets for keys at or before the query; every key
  after it shares bucket 0 with distance 0.

Which stack uses which (see megarch.model.transformer): the encoder is bidirectional; the
encoder-decoder's decoder self-attention is causal; decoder-only models use causal bucketing for
*both* CD and ND by default (``ModelConfig.decoder_rel_bidirectional``), as T5X's decoder_only
network of the study does: CD and ND must stay the same function of the same parameters, so that
adaptation (PAPER.md: LM-A, NC-A) changes only the mask. Within an ND prefix, later keys then
share bucket 0; the mask still lets the prefix attend both ways.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from megarch.parallel.tensor_parallel import set_partition_dim


def relative_position_buckets(
    relative_position: torch.Tensor,
    bidirectional: bool,
    n_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """T5 bucket index of each ``relative_position = key_pos - query_pos`` (int64, same shape).

    Per direction: distances below ``max_exact`` (half that direction's buckets) get a bucket
    each; larger distances are spaced logarithmically up to ``max_distance``, and farther ones
    share the last bucket. Bidirectional bucketing gives keys after the query buckets
    ``n_buckets // 2`` and up.
    """
    distance = -relative_position  # > 0: the key is before the query
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (distance < 0).long() * n_buckets
        distance = distance.abs()
    else:
        distance = distance.clamp(min=0)
    max_exact = n_buckets // 2
    # As T5X: float32 log with a float32 epsilon, so exact powers land on their bucket.
    ratio = distance.float() / max_exact + torch.finfo(torch.float32).eps
    far = max_exact + (
        torch.log(ratio) / math.log(max_distance / max_exact) * (n_buckets - max_exact)
    ).long()
    far = far.clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned bias table ``[n_buckets, n_heads]`` turned into attention-logit biases.

    ``n_heads`` is the number of heads this module serves (a tensor-parallel shard holds its own
    heads' columns).
    """

    def __init__(self, n_heads: int, bidirectional: bool, n_buckets: int = 32,
                 max_distance: int = 128):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets = n_buckets
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.empty(n_buckets, n_heads))  # [buckets, heads]
        set_partition_dim(self, "table", 1)  # one column per head

    def forward(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Bias ``[batch, heads, q_len, k_len]`` from positions [batch, q_len] / [batch, k_len]."""
        relative = k_positions[:, None, :] - q_positions[:, :, None]  # [batch, q_len, k_len]
        buckets = relative_position_buckets(
            relative, self.bidirectional, self.n_buckets, self.max_distance
        )
        bias = self.table[buckets]  # [batch, q_len, k_len, heads]
        return bias.permute(0, 3, 1, 2)  # [batch, heads, q_len, k_len]

    def lazy(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> RelativeBias:
        """The bias at these positions, not yet materialised: the attention kernel reads the
        table and positions itself; the reference path calls ``.dense()``."""
        return RelativeBias(self, q_positions, k_positions)

    def extra_repr(self) -> str:
        kind = "bidirectional" if self.bidirectional else "causal"
        return f"buckets={self.n_buckets}, max_distance={self.max_distance}, {kind}"


class RelativeBias(NamedTuple):
    """A T5 relative bias described by its table and the positions it is read at."""

    module: RelativePositionBias
    q_positions: torch.Tensor  # [batch, q_len]
    k_positions: torch.Tensor  # [batch, k_len]

    def dense(self) -> torch.Tensor:
        """The bias ``[batch, heads, q_len, k_len]``."""
        return self.module(self.q_positions, self.k_positions)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles' cos and sin ``[batch, 1, len, head_dim // 2]`` for ``positions``.

    Computed from scratch each call (no buffers), so a model built on the meta device needs no
    special initialisation for them.
    """
    half = head_dim // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) / half
    inv_freq = base ** -exponent  # [half]
    angles = positions.float()[:, None, :, None] * inv_freq  # [batch, 1, len, half]
    cos, sin = angles.cos(), angles.sin()
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of ``x`` [batch, heads, len, head_dim] by the given angles."""
    first, second = x.chunk(2, dim=-1)  # each [batch, heads, len, head_dim // 2]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
