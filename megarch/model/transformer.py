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
bias-table columns, the ``n_kv_heads / tp`` key/value heads of their groups and ``d_ff / tp``
feed-forward units, and the models return this rank's
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megarch.config.model import ModelConfig
from megarch.model.attention import MaskMode
from megarch.model.blocks import CrossAttentionBlock, SelfAttentionBlock, share_rel_bias
from megarch.model.cache import KVCache, LayerCache
from megarch.model.layers import RMSNorm
from megarch.model.position import RelativePositionBias
from megarch.model.stages import PipelineLayout, embedding_ranks, pipeline_layout, whole_model
from megarch.parallel.collectives import all_reduce_tensors, enter_tp, exit_tp
from megarch.parallel.context import ParallelContext
from megarch.parallel.pipeline import embedding_group
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


class Blocks(nn.ModuleDict):
    """The blocks a model (or pipeline stage) holds, by their global index: ``blocks[3]`` and
    ``blocks["3"]`` are block 3, iteration yields the blocks in index order. The parameter
    names are those of a list of all the blocks (``blocks.3.attn.q.weight``), so a stage's
    state dict is a slice of the whole model's."""

    def __getitem__(self, key: int | str) -> nn.Module:
        return super().__getitem__(str(key))

    def __iter__(self):
        return iter(self.values())


class _LanguageModel(nn.Module):
    """What both models share: the layout they hold a part of, the embedding, the output
    projection, init, checkpointing, the embedding copies of a pipeline."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None,
                 layout: PipelineLayout | None = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx or ParallelContext.single()
        self.layout = layout or whole_model(cfg)
        if self.layout.pp > 1 and self.ctx.sequence_parallel:
            raise ValueError("sequence parallelism with pipeline stages is not yet supported: "
                             "set parallel.sequence_parallel false or parallel.pp 1")
        self.pp_rank = self.ctx.pp_rank if self.layout.pp > 1 else 0
        self.chunks = self.layout.chunks(self.pp_rank)
        """The virtual stages this module holds (``[0]`` for the whole model)."""
        self.virtual_stages = self.layout.virtual_stages
        self.last_virtual = self.layout.n_virtual - 1
        self.first, self.last = 0 in self.chunks, self.last_virtual in self.chunks
        self.tp_group = self.ctx.tp_group if self.ctx.tp > 1 else None
        self.sequence_parallel = self.ctx.sequence_parallel and self.tp_group is not None
        vocab = cfg.vocab_size // self.ctx.tp  # this rank's rows (vocab-parallel)
        self.vocab_start = self.ctx.tp_rank * vocab
        self.embed = None
        if self.pp_rank in embedding_ranks(self.layout, cfg):
            self.embed = set_partition_dim(nn.Embedding(vocab, cfg.d_model), "weight", 0)
        self.lm_head = None
        if not cfg.tie_embeddings and self.last:
            self.lm_head = set_partition_dim(nn.Linear(cfg.d_model, vocab, bias=False),
                                             "weight", 0)  # vocab-parallel rows
        self.dropout = TensorParallelDropout(cfg.dropout, self.tp_group)  # split under SP
        self.embed_group: dist.ProcessGroup | None = None
        """The ranks holding a copy of the embedding (a pipeline's; set by build_stage)."""

    @property
    def is_whole(self) -> bool:
        """True when this module is the whole model (not one pipeline stage of it)."""
        return self.layout.n_virtual == 1

    def _require_whole(self, what: str) -> None:
        if not self.is_whole:
            raise RuntimeError(f"{what} runs the whole model; this is pipeline stage "
                               f"{self.pp_rank} of {self.layout.pp}: run it through "
                               "megarch.parallel.pipeline_schedules (stage.run_stage)")

    def input_shapes(self, virtual: int, batch: dict) -> list[tuple[int, ...]]:
        """Shapes of the tensors virtual stage ``virtual`` receives for ``batch``."""
        raise NotImplementedError

    @property
    def duplicated_parameters(self) -> frozenset[str]:
        """Names whose gradient another stage also holds (the embedding copies but rank 0's):
        skip them when summing gradient norms over the pipeline."""
        if self.embed is not None and self.pp_rank != 0:
            return frozenset({"embed.weight"})
        return frozenset()

    def reduce_tied_embedding_grads(self) -> None:
        """Sum the embedding gradients over the ranks holding a copy of the table (nothing
        for the whole model)."""
        if self.embed_group is not None and self.embed is not None:
            if self.embed.weight.grad is None:
                self.embed.weight.grad = torch.zeros_like(self.embed.weight)
            all_reduce_tensors([self.embed.weight.grad], self.embed_group)

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
        self._require_whole("incremental decoding (a KVCache)")
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
    """Decoder-only LM: the causal decoder (CAUSAL mask) and the non-causal one (PREFIX mask).

    With a ``layout`` (megarch.model.stages) it holds only its pipeline rank's blocks (and the
    embedding / final norm and head where its stages need them); :meth:`run_stage` runs one of
    its model chunks, and :meth:`forward` is that same code on the whole model.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None,
                 layout: PipelineLayout | None = None):
        if cfg.is_encoder_decoder:
            raise ValueError("DecoderLM needs arch causal_decoder or nonc_decoder")
        super().__init__(cfg, ctx, layout)
        self.mask_mode = MaskMode.CAUSAL if cfg.arch == "causal_decoder" else MaskMode.PREFIX
        self.blocks = Blocks({
            str(i): SelfAttentionBlock(cfg, cfg.decoder_rel_bidirectional, tp_group=self.tp_group)
            for k in self.chunks for i in self.layout.layers[k]
        })
        if cfg.rel_bias_shared:  # the whole model only (a pipeline refuses the option)
            share_rel_bias(list(self.blocks))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.last else None
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
        self._require_whole("DecoderLM.forward")
        batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
                 "prefix_len": prefix_len}
        return self.run_stage(batch, cache=cache)

    def input_shapes(self, virtual: int, batch: dict) -> list[tuple[int, ...]]:
        """The hidden state [batch, len, d_model] (nothing for virtual stage 0)."""
        return [(*batch["tokens"].shape, self.cfg.d_model)] if virtual > 0 else []

    def run_stage(self, batch: dict, inputs: tuple[torch.Tensor, ...] = (), chunk: int = 0,
                  cache: KVCache | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Model chunk ``chunk`` on ``batch`` (the sample fields): from ``batch["tokens"]``
        (virtual stage 0) or ``inputs = (hidden,)``. Returns ``(hidden,)``, or on the last
        stage the logits."""
        virtual = self.chunks[chunk]
        tokens = batch["tokens"]
        layers = self.layout.layers[virtual]
        layer_caches, positions = self.cache_layers(cache, len(layers), tokens,
                                                    batch.get("positions"),
                                                    batch.get("segment_ids"))
        segment_ids = batch.get("segment_ids")
        prefix = None
        if self.mask_mode == MaskMode.PREFIX:
            prefix = batch.get("prefix_len")
            prefix = prefix if prefix is not None else tokens.new_zeros(tokens.shape[0])
        x = self.dropout(self.embed_tokens(tokens)) if virtual == 0 else inputs[0]
        for i, layer_cache in zip(layers, layer_caches, strict=True):
            if layer_cache is None:  # the training path
                x = self.run_block(self.blocks[i], x, self.mask_mode, positions, segment_ids,
                                   prefix)
            else:
                x = self.blocks[i](x, self.mask_mode, positions, segment_ids, prefix,
                                   layer_cache)
        if virtual == self.last_virtual:
            return self.logits(self.dropout(self.final_norm(x)))  # [batch, len, vocab]
        return (x,)  # [batch, len, d_model]


class EncoderDecoderLM(_LanguageModel):
    """T5-style encoder-decoder: bidirectional encoder, causal decoder with cross-attention,
    one embedding shared by the encoder, the decoder and (tied) the output.

    With a ``layout`` it holds only its pipeline rank's blocks (see :class:`DecoderLM`);
    :meth:`encode`, :meth:`decode` and :meth:`forward` run the whole model through the same
    block loops as :meth:`run_stage`.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None,
                 layout: PipelineLayout | None = None):
        if not cfg.is_encoder_decoder:
            raise ValueError("EncoderDecoderLM needs arch encoder_decoder")
        super().__init__(cfg, ctx, layout)
        layout = self.layout
        self.encoder_blocks = Blocks({
            str(i): SelfAttentionBlock(cfg, bidirectional_buckets=True, tp_group=self.tp_group)
            for k in self.chunks for i in layout.encoder_layers(k)
        })
        holds_norm = layout.encoder_stages - 1 in self.chunks
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if holds_norm else None
        self.decoder_blocks = Blocks({
            str(i): CrossAttentionBlock(cfg, tp_group=self.tp_group)
            for k in self.chunks for i in layout.decoder_layers(k)
        })
        if cfg.rel_bias_shared:  # the whole model only (a pipeline refuses the option)
            share_rel_bias(list(self.encoder_blocks))
            share_rel_bias(list(self.decoder_blocks))
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.last else None
        self.mark_sequence_parallel()

    def _encoder(self, x: torch.Tensor, layers: range, positions: torch.Tensor,
                 segment_ids: torch.Tensor | None) -> torch.Tensor:
        for i in layers:
            x = self.run_block(self.encoder_blocks[i], x, MaskMode.BIDIRECTIONAL, positions,
                               segment_ids)
        return x

    def _decoder(self, x: torch.Tensor, layers: range, batch: dict, encoder_out: torch.Tensor,
                 cache: KVCache | None = None) -> torch.Tensor:
        tokens = batch["decoder_tokens"]
        layer_caches, positions = self.cache_layers(cache, len(layers), tokens,
                                                    batch.get("decoder_positions"),
                                                    batch.get("decoder_segment_ids"))
        segment_ids = batch.get("decoder_segment_ids")
        encoder_segment_ids = batch.get("encoder_segment_ids")
        if x is None:  # the first decoder stage embeds the decoder tokens
            x = self.dropout(self.embed_tokens(tokens))  # [batch, dec_len, d_model]
        for i, layer_cache in zip(layers, layer_caches, strict=True):
            block = self.decoder_blocks[i]
            if layer_cache is None:  # the training path
                x = self.run_block(block, x, positions, segment_ids, encoder_out,
                                   encoder_segment_ids)
            else:
                x = block(x, positions, segment_ids, encoder_out, encoder_segment_ids,
                          layer_cache)
        return x

    def encode(
        self,
        encoder_tokens: torch.Tensor,
        encoder_positions: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder output [batch, enc_len, d_model] (after the final norm and dropout)."""
        self._require_whole("EncoderDecoderLM.encode")
        positions = _default_positions(encoder_tokens, encoder_positions)
        x = self.dropout(self.embed_tokens(encoder_tokens))  # [batch, enc_len, d_model]
        x = self._encoder(x, self.layout.encoder_layers(0), positions, encoder_segment_ids)
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
        self._require_whole("EncoderDecoderLM.decode")
        batch = {"decoder_tokens": decoder_tokens, "decoder_positions": decoder_positions,
                 "decoder_segment_ids": decoder_segment_ids,
                 "encoder_segment_ids": encoder_segment_ids}
        x = self._decoder(None, self.layout.decoder_layers(0), batch, encoder_out, cache)
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
        self._require_whole("EncoderDecoderLM.forward")
        batch = {"encoder_tokens": encoder_tokens, "encoder_positions": encoder_positions,
                 "encoder_segment_ids": encoder_segment_ids, "decoder_tokens": decoder_tokens,
                 "decoder_positions": decoder_positions,
                 "decoder_segment_ids": decoder_segment_ids}
        return self.run_stage(batch)

    def input_shapes(self, virtual: int, batch: dict) -> list[tuple[int, ...]]:
        """Encoder stages: the encoder hidden state [batch, enc_len, d_model] (nothing for
        virtual stage 0); the first decoder stage: the encoder output of that shape; later
        decoder stages: the decoder hidden state [batch, dec_len, d_model] and the encoder
        output."""
        d = self.cfg.d_model
        encoder = (*batch["encoder_tokens"].shape, d)
        if virtual == 0:
            return []
        if virtual <= self.layout.encoder_stages:
            return [encoder]
        return [(*batch["decoder_tokens"].shape, d), encoder]

    def run_stage(self, batch: dict, inputs: tuple[torch.Tensor, ...] = (),
                  chunk: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Model chunk ``chunk`` on ``batch`` given ``inputs`` (see :meth:`input_shapes`).
        Returns ``(encoder hidden,)``, ``(encoder output,)`` (last encoder stage),
        ``(decoder hidden, encoder output)``, or on the last stage the logits."""
        virtual, layout = self.chunks[chunk], self.layout
        encoder_layers, decoder_layers = layout.encoder_layers(virtual), \
            layout.decoder_layers(virtual)
        x = None
        if len(encoder_layers):
            tokens = batch["encoder_tokens"]
            positions = _default_positions(tokens, batch.get("encoder_positions"))
            x = self.dropout(self.embed_tokens(tokens)) if virtual == 0 else inputs[0]
            x = self._encoder(x, encoder_layers, positions, batch.get("encoder_segment_ids"))
            if virtual == layout.encoder_stages - 1:
                x = self.dropout(self.encoder_norm(x))  # the encoder output
            if not len(decoder_layers):
                return (x,)  # [batch, enc_len, d_model]
            encoder_out, x = x, None  # the whole model goes on to its decoder
        elif virtual == layout.first_decoder:
            encoder_out = inputs[0]
        else:
            x, encoder_out = inputs
        x = self._decoder(x, decoder_layers, batch, encoder_out)
        if virtual == self.last_virtual:
            return self.logits(self.dropout(self.decoder_norm(x)))  # [batch, dec_len, vocab]
        return x, encoder_out  # the encoder output passes on (its gradient comes back)


def build_model(
    cfg: ModelConfig, device: torch.device | str | None = None,
    ctx: ParallelContext | None = None, seed: int | None = None,
) -> DecoderLM | EncoderDecoderLM:
    """The whole model for ``cfg.arch``, initialised on ``device`` (default CPU); with a
    tensor-parallel ``ctx``, this rank's shard (see the module docstring). The same ``seed``
    gives the same weights at every layout (None: drawn from the global RNG, so
    ``torch.manual_seed`` decides).

    ``device="meta"`` returns an uninitialised model that allocates no memory (for parameter
    counts, or to materialise later with ``model.to_empty(device=...)`` then
    ``model.init_weights()``).
    """
    return _build(cfg, device, ctx or ParallelContext.single(), whole_model(cfg), seed)


def build_stage(cfg: ModelConfig, ctx: ParallelContext, device: torch.device | str = "cpu",
                *, virtual_stages: int = 1, encoder_stages: int = 0,
                seed: int | None = None) -> DecoderLM | EncoderDecoderLM:
    """This rank's pipeline stage of the model (megarch.model.stages: its blocks of every
    model chunk, the embedding, norms and head where its stages need them), built from the
    model's own classes with the weights the whole model of ``seed`` has; with ``ctx.pp`` 1
    it is the whole model. Under ``torch.distributed`` (``ctx.pp_group`` set) it is
    collective: the ranks holding an embedding copy form its group. ``virtual_stages`` and
    ``encoder_stages`` are the :class:`~megarch.config.train.ParallelConfig` fields."""
    layout = pipeline_layout(cfg, ctx.pp, virtual_stages, encoder_stages)
    model = _build(cfg, device, ctx, layout, seed)
    if ctx.pp_group is not None and ctx.pp > 1:
        model.embed_group = embedding_group(ctx, embedding_ranks(layout, cfg))
    return model


def _build(cfg: ModelConfig, device: torch.device | str | None, ctx: ParallelContext,
           layout: PipelineLayout, seed: int | None) -> DecoderLM | EncoderDecoderLM:
    cfg.validate()
    check_tp_divisible(cfg, ctx.tp)
    device = torch.device(device if device is not None else "cpu")
    cls = EncoderDecoderLM if cfg.is_encoder_decoder else DecoderLM
    with torch.device("meta"):
        model = cls(cfg, ctx, layout)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %s: %.4gM parameters on %s (tp rank %d/%d, pp rank %d/%d)", cfg.arch,
                n_params / 1e6, device, ctx.tp_rank, ctx.tp, model.pp_rank, layout.pp)
    return model


def check_tp_divisible(cfg: ModelConfig, tp: int) -> None:
    """Refuse a tensor-parallel size that does not divide the sharded dimensions
    (:meth:`ModelConfig.validate_tp`; a ConfigError, which is a ValueError)."""
    cfg.validate_tp(tp)
