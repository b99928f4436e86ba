"""Pre-norm transformer blocks. Each block is self-contained: it holds its own relative position
bias table (when the model uses T5 biases) and computes everything it needs from the sample
fields it is given, so a pipeline stage can hold any run of blocks. (``model.rel_bias_shared``,
Hugging Face T5's layout, is the exception: a stack's first block holds the one table and the
others read it, :func:`share_rel_bias`; no pipeline then.) Given a tensor-parallel
group a block holds its rank's share of the heads (and of their bias-table columns) and of the
feed-forward hidden units.

Block layout (T5 v1.1 / T5X, pre-norm, dropout on each sub-layer's output)::

    x = x + dropout(self_attention(norm(x)))
    x = x + dropout(cross_attention(norm(x), encoder_out))     # encoder-decoder decoder only
    x = x + dropout(feed_forward(norm(x)))
"""

from __future__ import annotations

import torch
from torch import nn

from megarch.config.model import ModelConfig
from megarch.model.attention import MaskMode
from megarch.model.cache import LayerCache
from megarch.model.layers import CrossAttention, FeedForward, RMSNorm, SelfAttention
from megarch.model.position import RelativeBias, RelativePositionBias
from megarch.parallel.collectives import Group, group_size
from megarch.parallel.rng import TensorParallelDropout


def _position_parts(
    cfg: ModelConfig, n_heads: int, bidirectional: bool
) -> tuple[RelativePositionBias | None, float | None]:
    """This block's bias table (T5 relative) or rotary base (rotary); the other is None."""
    if cfg.position == "rotary":
        return None, cfg.rotary_base
    bias = RelativePositionBias(n_heads, bidirectional, cfg.rel_buckets, cfg.rel_max_distance)
    return bias, None


def _kv_heads(cfg: ModelConfig, n_heads: int) -> int:
    """The key/value heads serving ``n_heads`` query heads (this TP rank's share): whole
    groups of ``cfg.n_heads / cfg.kv_heads`` query heads each."""
    return n_heads // (cfg.n_heads // cfg.kv_heads)


def _lazy_bias(table: RelativePositionBias | None, positions: torch.Tensor,
               cache: LayerCache | None) -> RelativeBias | None:
    """The T5 bias of queries at ``positions`` over their keys: the same tokens, or in a
    cached step every cached slot."""
    if table is None:
        return None
    stepping = cache is not None and cache.owner.stepping
    return table.lazy(positions, cache.owner.key_positions if stepping else positions)


def _table(block: nn.Module) -> RelativePositionBias | None:
    """The block's own bias table, else the stack's shared one (``model.rel_bias_shared``)."""
    if block.rel_bias is not None:
        return block.rel_bias
    return block.shared_rel_bias[0] if block.shared_rel_bias else None


def share_rel_bias(blocks: list[nn.Module]) -> None:
    """Make every block read the first block's bias table (``model.rel_bias_shared``): the
    others drop their own, so the table is one parameter, in the first block's state, whose
    gradient sums over the layers. The reference is kept in a tuple, not as a submodule."""
    for block in blocks[1:]:
        block.rel_bias = None
        block.shared_rel_bias = (blocks[0].rel_bias,)


class SelfAttentionBlock(nn.Module):
    """Self-attention + GEGLU: the decoder-only layer (CD and ND) and the encoder layer.

    The mask mode is a forward argument, not part of the block: the same parameters serve the
    causal, prefix and bidirectional masks. ``bidirectional_buckets`` picks the relative
    position bucketing (see megarch.model.position).
    """

    shared_rel_bias: tuple = ()
    """(the first block's table,) when the stack shares one (:func:`share_rel_bias`)."""

    def __init__(self, cfg: ModelConfig, bidirectional_buckets: bool, n_heads: int | None = None,
                 tp_group: Group = None):
        super().__init__()
        tp = group_size(tp_group)
        n_heads = n_heads or cfg.n_heads // tp  # this tensor-parallel rank's heads
        n_kv_heads = _kv_heads(cfg, n_heads)
        self.rel_bias, rotary_base = _position_parts(cfg, n_heads, bidirectional_buckets)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, n_heads, cfg.kv_dim, cfg.dropout, rotary_base,
                                  tp_group, n_kv_heads)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff // tp, cfg.dropout, tp_group)
        self.dropout = TensorParallelDropout(cfg.dropout, tp_group)  # split under SP

    def forward(
        self,
        x: torch.Tensor,
        mode: MaskMode,
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [batch, len, d_model]; positions, segment_ids: [batch, len]; ``cache``: this
        layer's keys/values for incremental decoding (megarch.model.cache)."""
        bias = _lazy_bias(_table(self), positions, cache)
        h = self.attn(self.attn_norm(x), mode, positions=positions, segment_ids=segment_ids,
                      prefix_len=prefix_len, bias=bias, cache=cache)
        x = x + self.dropout(h)
        return x + self.dropout(self.ff(self.ff_norm(x)))  # [batch, len, d_model]


class CrossAttentionBlock(nn.Module):
    """The encoder-decoder's decoder layer: causal self-attention, cross-attention, GEGLU."""

    shared_rel_bias: tuple = ()
    """(the first block's table,) when the stack shares one (:func:`share_rel_bias`)."""

    def __init__(self, cfg: ModelConfig, n_heads: int | None = None, tp_group: Group = None):
        super().__init__()
        tp = group_size(tp_group)
        n_heads = n_heads or cfg.n_heads // tp  # this tensor-parallel rank's heads
        n_kv_heads = _kv_heads(cfg, n_heads)
        self.rel_bias, rotary_base = _position_parts(cfg, n_heads, bidirectional=False)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, n_heads, cfg.kv_dim, cfg.dropout, rotary_base,
                                  tp_group, n_kv_heads)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross = CrossAttention(cfg.d_model, n_heads, cfg.kv_dim, cfg.dropout, tp_group,
                                    n_kv_heads)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff // tp, cfg.dropout, tp_group)
        self.dropout = TensorParallelDropout(cfg.dropout, tp_group)  # split under SP

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None,
        encoder_out: torch.Tensor,
        encoder_segment_ids: torch.Tensor | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [batch, dec_len, d_model]; encoder_out: [batch, enc_len, d_model]; ``cache``:
        this layer's self- and cross-attention keys/values (megarch.model.cache)."""
        bias = _lazy_bias(_table(self), positions, cache)
        h = self.attn(self.attn_norm(x), MaskMode.CAUSAL, positions=positions,
                      segment_ids=segment_ids, bias=bias, cache=cache)
        x = x + self.dropout(h)
        h = self.cross(self.cross_norm(x), encoder_out, segment_ids=segment_ids,
                       encoder_segment_ids=encoder_segment_ids, cache=cache)
        x = x + self.dropout(h)
        return x + self.dropout(self.ff(self.ff_norm(x)))  # [batch, dec_len, d_model]
