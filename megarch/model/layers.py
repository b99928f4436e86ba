"""The layers of the study's blocks: RMS "T5 LayerNorm", GEGLU feed-forward, self- and
cross-attention. No biases anywhere (PAPER.md).

Every layer takes its sizes explicitly (not a ModelConfig), so a tensor-parallel rank can build
the same class with its share of heads (attention) or hidden units (feed-forward): the head /
hidden dimension of ``q, k, v, wi_*`` is column-sharded and the input dimension of ``o, wo``
row-sharded, Megatron-style, and each layer declares that partition where it builds the
parameter (:func:`megarch.parallel.tensor_parallel.set_partition_dim`). With a ``tp_group`` of
more than one process a layer copies its input into the tensor-parallel region (gradient
all-reduced backward) and all-reduces the partial output of its row-parallel projection
(megarch.parallel.collectives); with None it is the plain single-process layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megarch.model.attention import MaskMode, attention, attention_reference
from megarch.model.cache import LayerCache
from megarch.model.position import RelativeBias, apply_rotary, rotary_cos_sin
from megarch.parallel.collectives import Group, enter_tp, exit_tp
from megarch.parallel.rng import TensorParallelDropout
from megarch.parallel.tensor_parallel import set_partition_dim


@functools.cache
def apex_rms_norm() -> Callable | None:
    """NVIDIA apex's fused RMS norm function when that apex is installed, else None.

    Another package may also be called ``apex``: only one exposing
    ``apex.normalization.FusedRMSNorm`` counts. Absence is normal and silent.
    """
    try:
        import apex.normalization as normalization
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except Exception:  # ImportError, or a foreign "apex" failing in its own way
        return None
    if not hasattr(normalization, "FusedRMSNorm"):
        return None
    return fused_rms_norm_affine


class RMSNorm(nn.Module):
    """T5's LayerNorm: ``x / sqrt(mean(x^2) + eps) * weight``; no mean subtraction, no bias.

    Computed in float32 and returned in the input's dtype. On CUDA it uses apex's fused kernel
    when NVIDIA apex is installed.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            fused = apex_rms_norm()
            if fused is not None:
                return fused(x, self.weight, self.weight.shape, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FeedForward(nn.Module):
    """GEGLU: ``wo(gelu(wi_gate x) * wi_up x)``, tanh-approximated GELU as T5 v1.1/T5X."""

    sequence_parallel = False
    """Under TP: input and output are this rank's sequence chunk (set by the model)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, tp_group: Group = None):
        super().__init__()
        self.tp_group = tp_group  # d_ff is this rank's share of the hidden units
        self.wi_gate = set_partition_dim(nn.Linear(d_model, d_ff, bias=False), "weight", 0)
        self.wi_up = set_partition_dim(nn.Linear(d_model, d_ff, bias=False), "weight", 0)
        self.wo = set_partition_dim(nn.Linear(d_ff, d_model, bias=False), "weight", 1)
        self.dropout = TensorParallelDropout(dropout, tp_group, split=True)  # d_ff split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp(x, self.tp_group, self.sequence_parallel)  # [batch, len, d_model]
        hidden = F.gelu(self.wi_gate(x), approximate="tanh") * self.wi_up(x)  # [b, len, d_ff]
        out = self.wo(self.dropout(hidden))  # [batch, len, d_model], partial under TP
        return exit_tp(out, self.tp_group, self.sequence_parallel)


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, n_heads, -1).transpose(1, 2)  # [batch, heads, len, head_dim]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)  # [batch, len, heads * head_dim]


class _MultiHead(nn.Module):
    """The projections ``q, k, v, o`` (no biases) that self- and cross-attention share.

    ``k`` and ``v`` produce ``n_kv_heads`` heads (default ``n_heads``), a divisor of
    ``n_heads``: grouped-query attention, query head h reading KV head
    ``h // (n_heads / n_kv_heads)``. Under TP both counts are this rank's share (whole groups).
    """

    sequence_parallel = False
    """Under TP: input and output are this rank's sequence chunk (set by the model)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float,
                 tp_group: Group = None, n_kv_heads: int | None = None):
        super().__init__()
        self.tp_group = tp_group  # n_heads, n_kv_heads: this rank's share of the heads
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout = dropout
        inner, kv_inner = n_heads * head_dim, n_kv_heads * head_dim
        self.q = set_partition_dim(nn.Linear(d_model, inner, bias=False), "weight", 0)
        self.k = set_partition_dim(nn.Linear(d_model, kv_inner, bias=False), "weight", 0)
        self.v = set_partition_dim(nn.Linear(d_model, kv_inner, bias=False), "weight", 0)
        self.o = set_partition_dim(nn.Linear(inner, d_model, bias=False), "weight", 1)


class SelfAttention(_MultiHead):
    """Multi-head self-attention: projections ``q, k, v, o`` without biases.

    Logits are scaled by ``head_dim ** -0.5`` explicitly (T5 folds that factor into the query
    initialisation instead; the two are equivalent under Adafactor, and this one also under Adam).
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float = 0.0,
                 rotary_base: float | None = None, tp_group: Group = None,
                 n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, head_dim, dropout, tp_group, n_kv_heads)
        self.rotary_base = rotary_base  # None: no rotary (positions come as a bias)

    def forward(
        self,
        x: torch.Tensor,
        mode: MaskMode,
        *,
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        bias: torch.Tensor | RelativeBias | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [batch, len, d_model]; positions/segment_ids: [batch, len]; bias: [b, h, len, len].

        With a ``cache`` (megarch.model.cache) the keys/values are stored at ``positions``; in a
        cached step the queries attend to the cached slots (bias: [b, h, len, width]) under the
        cache's step mask, and ``mode``, ``segment_ids`` and ``prefix_len`` are not used.
        """
        x = enter_tp(x, self.tp_group, self.sequence_parallel)  # [batch, len, d_model]
        q = _split_heads(self.q(x), self.n_heads)  # [batch, heads, len, head_dim]
        k = _split_heads(self.k(x), self.n_kv_heads)  # [batch, kv_heads, len, head_dim]
        v = _split_heads(self.v(x), self.n_kv_heads)
        if self.rotary_base is not None:
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rotary_base, dtype=q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, positions)  # [batch, kv_heads, width, hd] in a step
            if cache.owner.stepping:
                if isinstance(bias, RelativeBias):
                    bias = bias.dense()
                out = attention_reference(q, k, v, cache.owner.step_mask, bias=bias,
                                          scale=self.head_dim**-0.5)
                return exit_tp(self.o(_merge_heads(out)), self.tp_group, self.sequence_parallel)
        out = attention(
            q, k, v, mode, q_segment_ids=segment_ids, k_segment_ids=segment_ids,
            prefix_len=prefix_len, bias=bias, dropout_p=self.dropout if self.training else 0.0,
            dropout_group=self.tp_group,
        )
        return exit_tp(self.o(_merge_heads(out)), self.tp_group, self.sequence_parallel)


class CrossAttention(_MultiHead):
    """Decoder-to-encoder attention (``MaskMode.CROSS``): queries from the decoder stream, keys
    and values from the encoder output. No position information, as in T5."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float = 0.0,
                 tp_group: Group = None, n_kv_heads: int | None = None):
        super().__init__(d_model, n_heads, head_dim, dropout, tp_group, n_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        encoder_out: torch.Tensor,
        *,
        segment_ids: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [batch, dec_len, d_model]; encoder_out: [batch, enc_len, d_model]. A ``cache``
        keeps the encoder output's keys/values from its first call on."""
        x = enter_tp(x, self.tp_group, self.sequence_parallel)
        q = _split_heads(self.q(x), self.n_heads)  # [batch, heads, dec_len, head_dim]

        def encoder_kv() -> tuple[torch.Tensor, torch.Tensor]:
            enc = enter_tp(encoder_out, self.tp_group, self.sequence_parallel)
            k = _split_heads(self.k(enc), self.n_kv_heads)  # [batch, kv_heads, enc_len, hd]
            return k, _split_heads(self.v(enc), self.n_kv_heads)

        k, v = encoder_kv() if cache is None else cache.cross_kv(encoder_kv)
        out = attention(
            q, k, v, MaskMode.CROSS, q_segment_ids=segment_ids,
            k_segment_ids=encoder_segment_ids, dropout_p=self.dropout if self.training else 0.0,
            dropout_group=self.tp_group,
        )
        return exit_tp(self.o(_merge_heads(out)), self.tp_group, self.sequence_parallel)
