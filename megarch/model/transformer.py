"""The study's models: decoder-only (causal and non-causal) and encoder-decoder.

Both take the sample fields of megarch.data.samples as keyword tensors, batched:

- :class:`DecoderLM`: ``tokens``, ``positions``, ``segment_ids``, ``prefix_len`` (and ignores
  ``labels`` / ``loss_mask``, so ``model(**batch)`` works).
- :class:`EncoderDecoderLM`: ``encoder_tokens``, ``encoder_positions``, ``encoder_segment_ids``,
  ``decoder_tokens``, ``decoder_positions``, ``decoder_segment_ids`` (ignores
  ``decoder_labels`` / ``decoder_loss_mask``).

Both return float32 logits ``[batch, len, vocab]``. With tied embeddings (the study's), the
output projection is the input embedding and the logits are scaled by ``d_model ** -0.5``
(T5). Omitted positions default to 0..len-1 and omitted segment ids to one unpadded segment.

CD and ND are one network (:class:`DecoderLM`): the same parameters under the same names; the
architecture only chooses the mask mode (CAUSAL or PREFIX). An ND checkpoint loads into a CD
model and back, which is all adaptation (PAPER.md) needs.

Build with :func:`build_model`, which constructs on the meta device first (so a full-scale model
costs no memory until materialised) and initialises on the target device:

- embeddings ~ N(0, init_std^2) (T5X: 1.0);
- every linear ~ truncated N(0, init_std^2 / fan_in) (T5X's variance scaling);
- relative bias tables ~ N(0, init_std^2 * 2 / (buckets + heads)) (T5X: fan-average);
- norm weights = 1.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megarch.config.model import ModelConfig
from megarch.model.attention import MaskMode
from megarch.model.blocks import CrossAttentionBlock, SelfAttentionBlock
from megarch.model.layers import RMSNorm
from megarch.model.position import RelativePositionBias

logger = logging.getLogger(__name__)


def _default_positions(tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is not None:
        return positions
    return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [b, len]


def _float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32, also under autocast (logits are kept in float32, as T5X)."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return F.linear(x.float(), weight.float())
    return F.linear(x.float(), weight.float())


class _LanguageModel(nn.Module):
    """What both models share: the embedding, the output projection, init, checkpointing."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits [batch, len, vocab] from final hidden states [batch, len, d_model]."""
        if self.lm_head is None:
            return _float32_linear(x.float() * self.cfg.d_model**-0.5, self.embed.weight)
        return _float32_linear(x, self.lm_head.weight)

    def run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """``block(*args)``, recomputed in the backward pass when activation checkpointing."""
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter from the global RNG (see the module docstring)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = std / math.sqrt(module.in_features)
                nn.init.trunc_normal_(module.weight, std=scale, a=-2 * scale, b=2 * scale)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RelativePositionBias):
                buckets, heads = module.table.shape
                nn.init.normal_(module.table, std=std * math.sqrt(2.0 / (buckets + heads)))


class DecoderLM(_LanguageModel):
    """Decoder-only LM: the causal decoder (CAUSAL mask) and the non-causal one (PREFIX mask)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.is_encoder_decoder:
            raise ValueError("DecoderLM needs arch causal_decoder or nonc_decoder")
        self.mask_mode = MaskMode.CAUSAL if cfg.arch == "causal_decoder" else MaskMode.PREFIX
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg, cfg.decoder_rel_bidirectional) for _ in range(cfg.n_layers)
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, len, vocab] (float32) for ``tokens`` [batch, len].

        ``prefix_len`` ([batch] or [batch, len]) is used by ND only; ND without it is causal.
        ``labels`` and ``loss_mask`` are accepted and unused.
        """
        positions = _default_positions(tokens, positions)
        prefix = None
        if self.mask_mode == MaskMode.PREFIX:
            prefix = prefix_len if prefix_len is not None else tokens.new_zeros(tokens.shape[0])
        x = self.dropout(self.embed(tokens))  # [batch, len, d_model]
        for block in self.blocks:
            x = self.run_block(block, x, self.mask_mode, positions, segment_ids, prefix)
        return self.logits(self.dropout(self.final_norm(x)))  # [batch, len, vocab]


class EncoderDecoderLM(_LanguageModel):
    """T5-style encoder-decoder: bidirectional encoder, causal decoder with cross-attention,
    one embedding shared by the encoder, the decoder and (tied) the output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if not cfg.is_encoder_decoder:
            raise ValueError("EncoderDecoderLM needs arch encoder_decoder")
        self.encoder_blocks = nn.ModuleList(
            SelfAttentionBlock(cfg, bidirectional_buckets=True) for _ in range(cfg.n_layers)
        )
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(cfg) for _ in range(cfg.decoder_layers)
        )
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def encode(
        self,
        encoder_tokens: torch.Tensor,
        encoder_positions: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder output [batch, enc_len, d_model] (after the final norm and dropout)."""
        positions = _default_positions(encoder_tokens, encoder_positions)
        x = self.dropout(self.embed(encoder_tokens))  # [batch, enc_len, d_model]
        for block in self.encoder_blocks:
            x = self.run_block(block, x, MaskMode.BIDIRECTIONAL, positions, encoder_segment_ids)
        return self.dropout(self.encoder_norm(x))

    def decode(
        self,
        decoder_tokens: torch.Tensor,
        encoder_out: torch.Tensor,
        decoder_positions: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, dec_len, vocab] (float32) given the encoder output."""
        positions = _default_positions(decoder_tokens, decoder_positions)
        x = self.dropout(self.embed(decoder_tokens))  # [batch, dec_len, d_model]
        for block in self.decoder_blocks:
            x = self.run_block(block, x, positions, decoder_segment_ids, encoder_out,
                               encoder_segment_ids)
        return self.logits(self.dropout(self.decoder_norm(x)))  # [batch, dec_len, vocab]

    def forward(
        self,
        encoder_tokens: torch.Tensor,
        decoder_tokens: torch.Tensor,
        encoder_positions: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
        decoder_positions: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
        decoder_labels: torch.Tensor | None = None,
        decoder_loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder logits [batch, dec_len, vocab] (float32); labels/loss mask are unused."""
        encoder_out = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids)
        return self.decode(decoder_tokens, encoder_out, decoder_positions, decoder_segment_ids,
                           encoder_segment_ids)


def build_model(
    cfg: ModelConfig, device: torch.device | str | None = None
) -> DecoderLM | EncoderDecoderLM:
    """The model for ``cfg.arch``, initialised on ``device`` (default CPU).

    ``device="meta"`` returns an uninitialised model that allocates no memory (for parameter
    counts, or to materialise later with ``model.to_empty(device=...)`` then
    ``model.init_weights()``).
    """
    cfg.validate()
    device = torch.device(device if device is not None else "cpu")
    cls = EncoderDecoderLM if cfg.is_encoder_decoder else DecoderLM
    with torch.device("meta"):
        model = cls(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %s: %.4gM parameters on %s", cfg.arch, n_params / 1e6, device)
    return model
