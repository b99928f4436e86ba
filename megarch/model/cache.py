"""A key/value cache for incremental decoding (generation), for every architecture.

Generation feeds a prompt once (the *prefill*) and then only the new token(s) of each step. The
cache keeps, per attention layer, the keys and values of every token seen so far, so a step
costs one token's work per layer instead of a pass over the whole sequence.

Layout: one row per sequence, and the token at position ``p`` of a row lives in cache slot
``p`` (keys/values ``[batch, kv_heads, capacity, head_dim]``, keys after rotary; with
grouped-query attention only the ``model.n_kv_heads`` key/value heads are stored). So rows of
different lengths need no alignment: each writes its new token at its own position.

- Prefill (the first forward pass given the cache): the model runs exactly as without a cache
  (same masks: causal, ND's bidirectional prefix, padding by segment id 0) and stores each
  layer's keys/values at the slots given by ``positions`` (default ``0..len-1``; distinct
  within a row) and each slot's segment id. Padding slots (segment 0) hold junk; no query
  ever sees them.
- Step (every later pass): the new tokens come with their ``positions`` (required). Each layer
  writes their keys/values at those slots, then the query at position ``p`` sees the slots
  ``0..p`` of its row's last segment: every earlier token of its sequence and itself. That is
  the causal rule, and also ND's once the whole prefix went through the prefill (new tokens
  are past the prefix, so they are causal; a prefix cannot be fed in steps). Slots up to
  ``p`` must have been written (they are when a row's tokens arrive in position order).
- Encoder-decoder: each decoder layer also keeps the cross-attention keys/values of the
  encoder output, computed in the prefill and reused by every step (the encoder output must
  stay the same for the cache's lifetime).

The cache belongs to the model that filled it (its layer count and head shapes) and to one
batch. The attention of a step runs the PyTorch reference with an explicit mask (a one-token
query gains nothing from the fused kernel); the prefill dispatches as a training pass does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LayerCache:
    """One attention layer's cached keys/values (see the module docstring)."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.keys: torch.Tensor | None = None  # [batch, kv_heads, capacity, head_dim]
        self.values: torch.Tensor | None = None
        self.cross: tuple[torch.Tensor, torch.Tensor] | None = None  # [b, kv_heads, enc, hd]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` [batch, kv_heads, len, head_dim] at slots ``positions`` [batch, len]
        and return the keys/values the queries attend to: the given ones in the prefill, the
        cached slots ``0..width-1`` in a step."""
        if self.keys is None:
            batch, heads, _, head_dim = k.shape
            shape = (batch, heads, self.owner.capacity, head_dim)
            self.keys = k.new_zeros(shape)
            self.values = v.new_zeros(shape)
        slots = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.keys.scatter_(2, slots, k)
        self.values.scatter_(2, slots, v)
        if not self.owner.stepping:
            return k, v
        width = self.owner.width
        return self.keys[:, :, :width], self.values[:, :, :width]

    def cross_kv(self, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys/values: ``compute()`` on the first call, cached after."""
        if self.cross is None:
            self.cross = compute()
        return self.cross


class KVCache:
    """Keys/values of the tokens seen so far, per layer, for incremental decoding.

    Create an empty one per batch, ``KVCache(capacity)`` with ``capacity`` > the largest
    position that will be fed (prompt + new tokens), and pass it to every forward pass of that
    batch (``DecoderLM(..., cache=)``, ``EncoderDecoderLM.decode(..., cache=)``). The first
    pass is the prefill, the others steps (module docstring).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"KVCache capacity={capacity}: must be >= 1 (prompt + new tokens)")
        self.capacity = capacity
        self.layers: list[LayerCache] = []
        self.prefilled = False
        """Whether the prefill ran: every later pass is a step."""
        self.stepping = False
        """Whether the pass in progress is a step."""
        self.width = 0
        """During a step: the number of slots attended to (the largest position + 1)."""
        self.step_mask: torch.Tensor | None = None
        """During a step: the visibility mask [batch, 1, len, width] (True = visible)."""
        self.key_positions: torch.Tensor | None = None
        """During a step: the positions of the attended slots [batch, width]."""
        self.slot_segments: torch.Tensor | None = None
        """Each slot's segment id [batch, capacity] (0: padding or never written)."""
        self.row_segment: torch.Tensor | None = None
        """Each row's last segment [batch]: the one its new tokens continue."""

    def begin(self, n_layers: int, tokens: torch.Tensor, positions: torch.Tensor | None,
              segment_ids: torch.Tensor | None = None
              ) -> tuple[list[LayerCache], torch.Tensor]:
        """Start a forward pass over ``tokens`` [batch, len] (called by the model): one
        :class:`LayerCache` per layer, and the tokens' positions [batch, len].

        ``positions`` None: the prefill's default ``0..len-1``; a step must give them.
        ``segment_ids`` (prefill; default all 1, 0 = padding): each slot remembers its
        token's segment, and a step's tokens continue their row's last segment and see only
        that segment's slots (padding and other packed segments stay hidden, wherever they
        sit in the row).
        """
        if not self.layers:
            self.layers = [LayerCache(self) for _ in range(n_layers)]
        elif len(self.layers) != n_layers:
            raise ValueError(f"this KVCache holds {len(self.layers)} layers, the model has "
                             f"{n_layers}: use a new cache per model and batch")
        stepping = self.prefilled
        if positions is None:
            if stepping:
                raise ValueError("a cached step needs the new tokens' positions "
                                 "([batch, len], from the prompt's length on)")
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        last = int(positions.max())
        batch = self.layers[0].keys.shape[0] if self.layers[0].keys is not None else None
        if last >= self.capacity or batch not in (None, tokens.shape[0]):
            raise ValueError(f"position {last} in a batch of {tokens.shape[0]} does not fit this "
                             f"KVCache (capacity {self.capacity}, batch {batch}): use one cache "
                             "per batch, with capacity >= prompt + new tokens")
        if positions.shape[1] > 1 and bool(
                (positions.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("a cached pass needs distinct positions within each row (one "
                             "cache slot per position): give padding its own positions, "
                             "e.g. the default 0..len-1 with segment id 0")
        if not stepping:
            self._prefill_segments(positions, segment_ids)
        else:
            self.slot_segments.scatter_(1, positions, self.row_segment[:, None].expand_as(
                positions))
            self.width = last + 1
            slots = torch.arange(self.width, device=positions.device)
            self.key_positions = slots.expand(positions.shape[0], -1)  # [batch, width]
            same = self.slot_segments[:, None, : self.width] == self.row_segment[:, None, None]
            visible = (slots[None, None, :] <= positions[:, :, None]) & same  # [b, len, width]
            self.step_mask = visible[:, None]  # [batch, 1, len, width]
        self.stepping = stepping
        self.prefilled = True
        return self.layers, positions

    def _prefill_segments(self, positions: torch.Tensor, segment_ids: torch.Tensor | None
                          ) -> None:
        """Record each slot's segment and each row's last segment (the one steps continue)."""
        segments = (torch.ones_like(positions) if segment_ids is None
                    else segment_ids.to(positions.dtype))
        self.slot_segments = torch.zeros(positions.shape[0], self.capacity, dtype=torch.long,
                                         device=positions.device)
        self.slot_segments.scatter_(1, positions, segments)
        real = torch.where(segments > 0, positions, -1)  # the last non-padding token's segment
        self.row_segment = segments.gather(1, real.argmax(dim=1, keepdim=True))[:, 0]
