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

Tensor parallelism: given a :class:`~megarch.parallel.context.ParallelContext` with ``tp > 1``
each rank holds ``vocab / tp`` embedding rows (vocab-parallel), ``n_heads / tp`` heads with their
bias-table columns and ``d_ff / tp`` feed-forward units, and the models return this rank's
*vocab shard* of the logits ``[batch, len, vocab / tp]``: pass ``tp_group`` to
:func:`megarch.model.loss.lm_loss` for the vocab-parallel cross-entropy and z-loss. With
``ctx.sequence_parallel`` the residual stream between layers is this rank's chunk of the
sequence (the inputs stay whole); the norm weights' gradients are then partial per rank and
must be summed with :func:`megarch.parallel.tensor_parallel.reduce_sequence_parallel_grads`.

CD and ND are one network (:class:`DecoderLM`): the same parameters under the same names; the
architecture only chooses the mask mode (CAUSAL or PREFIX). An ND checkpoint loads into a CD
model and back, which is all adaptation (PAPER.md) needs.

Build with :func:`build_model`, which constructs on the meta device first (so a full-scale model
costs no memory until materialised) and initialises on the target device:

- embeddings ~ N(0, init_std^2) (T5X: 1.0);
- every linear ~ truncated N(0, init_std^2 / fan_in) (T5X's variance scaling);
- relative bias tables ~ N(0, init_std^2 * 2 / (buckets + heads)) (T5X: fan-average);
- norm weights = 1.

Initialisation is layout-invariant (:func:`init_parameters`): every parameter is drawn from its
own generator, seeded by the run seed and the parameter's name, as the *full* tensor, of which
each tensor-parallel rank keeps its chunk. Pipeline stages and virtual stages keep the
single-process names, so the same seed gives the same weights, bitwise, at any TP / PP /
virtual-stage / DP layout, and no rank ever holds more than one full parameter at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megarch.config.model import ModelConfig
from megarch.model.attention import MaskMode
from megarch.model.blocks import CrossAttentionBlock, SelfAttentionBlock, share_rel_bias
from megarch.model.cache import KVCache, LayerCache
from megarch.model.layers import RMSNorm
from megarch.model.position import RelativePositionBias
from megarch.parallel.collectives import enter_tp, exit_tp
from megarch.parallel.context import ParallelContext
from megarch.parallel.rng import TensorParallelDropout, global_draw
from megarch.parallel.tensor_parallel import partition_dims, set_partition_dim, shard_tensor

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

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx or ParallelContext.single()
        self.tp_group = self.ctx.tp_group if self.ctx.tp > 1 else None
        self.sequence_parallel = self.ctx.sequence_parallel and self.tp_group is not None
        vocab = cfg.vocab_size // self.ctx.tp  # this rank's rows (vocab-parallel)
        self.vocab_start = self.ctx.tp_rank * vocab
        self.embed = set_partition_dim(nn.Embedding(vocab, cfg.d_model), "weight", 0)
        self.lm_head = None if cfg.tie_embeddings else set_partition_dim(
            nn.Linear(cfg.d_model, vocab, bias=False), "weight", 0)  # vocab-parallel rows
        self.dropout = TensorParallelDropout(cfg.dropout, self.tp_group)  # split under SP

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings [batch, len, d_model] of ``tokens`` [batch, len] (vocab-parallel: each rank
        looks up the ids in its rows, zeros the others, and the shards are summed)."""
        if self.tp_group is None:
            return self.embed(tokens)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.embed.num_embeddings)
        x = self.embed(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0.0)
        return exit_tp(x, self.tp_group, self.sequence_parallel)  # [b, len (/ tp if SP), d]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits [batch, len, vocab] (under TP: this rank's [.., vocab / tp]) from the
        final hidden states [batch, len, d_model]."""
        x = enter_tp(x, self.tp_group, self.sequence_parallel)  # [batch, len, d_model]
        if self.lm_head is None:
            return _float32_linear(x.float() * self.cfg.d_model**-0.5, self.embed.weight)
        return _float32_linear(x, self.lm_head.weight)

    def mark_sequence_parallel(self) -> None:
        """Tell every attention and feed-forward layer to take and return sequence chunks
        (called at the end of construction; nothing without sequence parallelism)."""
        if self.sequence_parallel:
            for module in self.modules():
                if hasattr(module, "sequence_parallel") and module is not self:
                    module.sequence_parallel = True

    def cache_layers(self, cache: KVCache | None, n_layers: int, tokens: torch.Tensor,
                     positions: torch.Tensor | None, segment_ids: torch.Tensor | None = None
                     ) -> tuple[list[LayerCache | None], torch.Tensor]:
        """Per block, its :class:`LayerCache` (all None without a ``cache``), and the
        tokens' positions (defaults filled in)."""
        if cache is None:
            return [None] * n_layers, _default_positions(tokens, positions)
        if self.sequence_parallel:
            raise ValueError("incremental decoding (a KVCache) does not run under sequence "
                             "parallelism: set parallel.sequence_parallel false to generate")
        layers, positions = cache.begin(n_layers, tokens, positions, segment_ids)
        return list(layers), positions

    def run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """``block(*args)``, recomputed in the backward pass when activation checkpointing."""
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter (see :func:`init_parameters`); ``seed`` None: one
        draw from the global RNG."""
        init_parameters(self, self.cfg.init_std, self.ctx.tp, self.ctx.tp_rank, seed)


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s generator in a run of ``seed`` (a stable hash)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, tp: int = 1, tp_rank: int = 0,
                    seed: int | None = None) -> None:
    """Initialise ``model``'s parameters layout-invariantly (see the module docstring): each
    one's full tensor from a generator seeded by :func:`parameter_seed` on the parameter's
    device, then this TP rank's chunk along its declared partition dim. A parameter of a
    module type with no rule here is refused (a new layer must say how it starts)."""
    seed = global_draw() if seed is None else seed
    dims = partition_dims(model)
    for prefix, module in model.named_modules():
        for short, param in module.named_parameters(recurse=False):
            name = f"{prefix}.{short}" if prefix else short
            dim = dims[name]
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= tp
            full = torch.empty(shape, dtype=param.dtype, device=param.device)
            generator = torch.Generator(device=param.device)
            generator.manual_seed(parameter_seed(seed, name))
            if isinstance(module, nn.Linear):
                scale = std / math.sqrt(shape[1])  # the whole layer's fan-in
                nn.init.trunc_normal_(full, std=scale, a=-2 * scale, b=2 * scale,
                                      generator=generator)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(full, std=std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(full)
            elif isinstance(module, RelativePositionBias):
                buckets, heads = shape  # the fan of the whole table, all heads
                nn.init.normal_(full, std=std * math.sqrt(2.0 / (buckets + heads)),
                                generator=generator)
            else:
                raise TypeError(f"{name}: no initialisation rule for {type(module).__name__}")
            param.copy_(shard_tensor(full, dim, tp_rank, tp, name))


class DecoderLM(_LanguageModel):
    """Decoder-only LM: the causal decoder (CAUSAL mask) and the non-causal one (PREFIX mask)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None):
        super().__init__(cfg, ctx)
        if cfg.is_encoder_decoder:
            raise ValueError("DecoderLM needs arch causal_decoder or nonc_decoder")
        self.mask_mode = MaskMode.CAUSAL if cfg.arch == "causal_decoder" else MaskMode.PREFIX
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg, cfg.decoder_rel_bidirectional, tp_group=self.tp_group)
            for _ in range(cfg.n_layers)
        )
        if cfg.rel_bias_shared:
            share_rel_bias(self.blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mark_sequence_parallel()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [batch, len, vocab] (float32) for ``tokens`` [batch, len].

        ``prefix_len`` ([batch] or [batch, len]) is used by ND only; ND without it is causal.
        ``labels`` and ``loss_mask`` are accepted and unused. ``cache``: incremental decoding
        (megarch.model.cache): the first pass is the prefill, later ones feed new tokens at
        their ``positions`` (required then; ``segment_ids`` and ``prefix_len`` unused).
        """
        layer_caches, positions = self.cache_layers(cache, len(self.blocks), tokens, positions,
                                                    segment_ids)
        prefix = None
        if self.mask_mode == MaskMode.PREFIX:
            prefix = prefix_len if prefix_len is not None else tokens.new_zeros(tokens.shape[0])
        x = self.dropout(self.embed_tokens(tokens))  # [batch, len, d_model]
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            if layer_cache is None:  # the training path, unchanged
                x = self.run_block(block, x, self.mask_mode, positions, segment_ids, prefix)
            else:
                x = block(x, self.mask_mode, positions, segment_ids, prefix, layer_cache)
        return self.logits(self.dropout(self.final_norm(x)))  # [batch, len, vocab]


class EncoderDecoderLM(_LanguageModel):
    """T5-style encoder-decoder: bidirectional encoder, causal decoder with cross-attention,
    one embedding shared by the encoder, the decoder and (tied) the output."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None):
        super().__init__(cfg, ctx)
        if not cfg.is_encoder_decoder:
            raise ValueError("EncoderDecoderLM needs arch encoder_decoder")
        self.encoder_blocks = nn.ModuleList(
            SelfAttentionBlock(cfg, bidirectional_buckets=True, tp_group=self.tp_group)
            for _ in range(cfg.n_layers)
        )
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(cfg, tp_group=self.tp_group) for _ in range(cfg.decoder_layers)
        )
        if cfg.rel_bias_shared:
            share_rel_bias(self.encoder_blocks)
            share_rel_bias(self.decoder_blocks)
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mark_sequence_parallel()

    def encode(
        self,
        encoder_tokens: torch.Tensor,
        encoder_positions: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder output [batch, enc_len, d_model] (after the final norm and dropout)."""
        positions = _default_positions(encoder_tokens, encoder_positions)
        x = self.dropout(self.embed_tokens(encoder_tokens))  # [batch, enc_len, d_model]
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
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [batch, dec_len, vocab] (float32) given the encoder output.

        ``cache``: incremental decoding (megarch.model.cache): the first pass is the prefill
        (it also caches the cross-attention keys/values of ``encoder_out``), later ones feed
        new decoder tokens at their ``decoder_positions`` (required then).
        """
        layer_caches, positions = self.cache_layers(cache, len(self.decoder_blocks),
                                                    decoder_tokens, decoder_positions,
                                                    decoder_segment_ids)
        x = self.dropout(self.embed_tokens(decoder_tokens))  # [batch, dec_len, d_model]
        for block, layer_cache in zip(self.decoder_blocks, layer_caches, strict=True):
            if layer_cache is None:  # the training path, unchanged
                x = self.run_block(block, x, positions, decoder_segment_ids, encoder_out,
                                   encoder_segment_ids)
            else:
                x = block(x, positions, decoder_segment_ids, encoder_out, encoder_segment_ids,
                          layer_cache)
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
    cfg: ModelConfig, device: torch.device | str | None = None,
    ctx: ParallelContext | None = None, seed: int | None = None,
) -> DecoderLM | EncoderDecoderLM:
    """The model for ``cfg.arch``, initialised on ``device`` (default CPU); with a tensor-parallel
    ``ctx``, this rank's shard (see the module docstring). The same ``seed`` gives the same
    weights at every layout (None: drawn from the global RNG, so ``torch.manual_seed`` decides).

    ``device="meta"`` returns an uninitialised model that allocates no memory (for parameter
    counts, or to materialise later with ``model.to_empty(device=...)`` then
    ``model.init_weights()``).
    """
    cfg.validate()
    ctx = ctx or ParallelContext.single()
    check_tp_divisible(cfg, ctx.tp)
    device = torch.device(device if device is not None else "cpu")
    cls = EncoderDecoderLM if cfg.is_encoder_decoder else DecoderLM
    with torch.device("meta"):
        model = cls(cfg, ctx)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %s: %.4gM parameters on %s (tp rank %d/%d)", cfg.arch, n_params / 1e6,
                device, ctx.tp_rank, ctx.tp)
    return model


def check_tp_divisible(cfg: ModelConfig, tp: int) -> None:
    """Refuse a tensor-parallel size that does not divide the sharded dimensions."""
    for name in ("vocab_size", "n_heads", "d_ff"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"model.{name}={getattr(cfg, name)} is not divisible by "
                             f"parallel.tp={tp}: change one of them")
