"""Pipeline parallelism: per-rank stage modules (this file) and their schedules
(:mod:`megarch.parallel.pipeline_schedules`: 1F1B, interleaved 1F1B, forward only).

The model is cut into ``pp * virtual_stages`` *virtual stages*, each a run of consecutive
blocks (:class:`PipelineLayout`). Rank ``r`` of the pipeline holds virtual stages
``r, r + pp, r + 2 pp, ...`` (its *model chunks*, Megatron's interleaved assignment; one chunk
when ``virtual_stages = 1``). Each rank builds only its own layers, in ONE module whose
parameter names are the single-process model's (``blocks.<global index>...``,
``encoder_blocks.<i>``, ``decoder_blocks.<i>``), so a full state dict loads into a stage by
name and stage checkpoints merge by name.

- Decoder-only (:class:`DecoderStage`): virtual stage 0 embeds the tokens, the last one applies
  the final norm and the output projection; the hidden state [batch, len, d_model] travels.
- Encoder-decoder (:class:`EncoderDecoderStage`): the first ``encoder_stages`` virtual stages
  hold the encoder blocks (the last of them also the encoder's final norm), the others the
  decoder blocks. The encoder output travels from the last encoder stage to every decoder
  stage, carried with the decoder hidden state ([batch, dec_len, d_model] and
  [batch, enc_len, d_model]); its gradient flows back summed over the decoder stages using it.

The embedding table is held by the rank of virtual stage 0, (encoder-decoder) the rank of the
first decoder stage, and (tied embeddings) the rank of the last stage. The copies start equal
(initialisation draws each parameter from a generator keyed by its name,
megarch.model.transformer) and stay equal: after the backward pass their
gradients are summed over the ranks holding one (Megatron's embedding group), and only the
first rank's copy counts in the gradient norm (:attr:`_Stage.duplicated_parameters`).

Every stage reads the same micro-batches (the sample fields); only the tensors above travel
between ranks, by explicit point-to-point sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megarch.config.model import ModelConfig
from megarch.model.attention import MaskMode
from megarch.model.blocks import CrossAttentionBlock, SelfAttentionBlock
from megarch.model.layers import RMSNorm
from megarch.model.transformer import _default_positions, _LanguageModel
from megarch.parallel.collectives import all_reduce_tensors
from megarch.parallel.context import ParallelContext
from megarch.parallel.pipeline_schedules import (
    forward_only,
    interleaved_one_f_one_b,
    one_f_one_b,
)


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> range:
    """The global indices of the blocks of stage ``pp_rank`` (as even a split as possible)."""
    base, extra = divmod(n_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


@dataclass(frozen=True)
class PipelineLayout:
    """Which blocks each virtual stage holds, and which rank holds each virtual stage."""

    pp: int
    """Pipeline ranks."""
    virtual_stages: int
    """Model chunks per rank."""
    encoder_stages: int
    """Virtual stages holding encoder blocks (0 for decoder-only models)."""
    layers: tuple[range, ...]
    """Per virtual stage, the global indices of its blocks (encoder or decoder numbering)."""

    @property
    def n_virtual(self) -> int:
        """pp * virtual_stages."""
        return self.pp * self.virtual_stages

    def virtual(self, pp_rank: int, chunk: int) -> int:
        """The virtual stage of ``pp_rank``'s model chunk ``chunk``."""
        return chunk * self.pp + pp_rank

    def rank_of(self, virtual: int) -> int:
        """The pipeline rank holding virtual stage ``virtual``."""
        return virtual % self.pp

    def is_encoder(self, virtual: int) -> bool:
        """True on a virtual stage of encoder blocks."""
        return virtual < self.encoder_stages


def pipeline_layout(cfg: ModelConfig, pp: int, virtual_stages: int = 1,
                    encoder_stages: int = 0) -> PipelineLayout:
    """The split of ``cfg``'s blocks over ``pp * virtual_stages`` virtual stages.

    Decoder-only: the blocks as evenly as possible (``n_layers`` must divide by
    ``pp * virtual_stages`` when interleaving). Encoder-decoder: ``encoder_stages`` virtual
    stages of encoder blocks (0: by layer count, ``round(n * enc / (enc + dec))``), the rest
    of decoder blocks; every virtual stage needs at least one block. Raises ValueError naming
    the parallel field to change.
    """
    if pp < 1 or virtual_stages < 1:
        raise ValueError(f"parallel.pp={pp} and parallel.virtual_stages={virtual_stages}: "
                         "must be >= 1")
    n = pp * virtual_stages
    if not cfg.is_encoder_decoder:
        if encoder_stages:
            raise ValueError(f"parallel.encoder_stages={encoder_stages} with model.arch="
                             f"{cfg.arch}: only encoder-decoders have encoder stages; set 0")
        if virtual_stages > 1 and cfg.n_layers % n:
            raise ValueError(f"model.n_layers={cfg.n_layers} is not divisible by parallel.pp x "
                             f"virtual_stages = {n}: change one of them")
        if cfg.n_layers < n:
            raise ValueError(f"model.n_layers={cfg.n_layers} < parallel.pp x virtual_stages = "
                             f"{n}: every virtual stage needs a block")
        return PipelineLayout(pp, virtual_stages, 0,
                              tuple(stage_layers(cfg.n_layers, n, k) for k in range(n)))
    enc, dec = cfg.n_layers, cfg.decoder_layers
    if enc + dec < n:
        raise ValueError(f"model.n_layers + decoder layers = {enc + dec} < parallel.pp x "
                         f"virtual_stages = {n}: every virtual stage needs a block")
    if encoder_stages == 0:  # by layer count, then clamped so every stage gets a block
        encoder_stages = min(max(round(n * enc / (enc + dec)), 1, n - dec), n - 1, enc)
    if not (1 <= encoder_stages <= n - 1 and encoder_stages <= enc and n - encoder_stages <= dec):
        raise ValueError(
            f"parallel.encoder_stages={encoder_stages}: with {n} virtual stages, {enc} encoder "
            f"and {dec} decoder layers it must leave every stage at least one block (1 .. "
            f"{n - 1}, <= {enc}, >= {n - dec}); set 0 for the automatic split")
    layers = [stage_layers(enc, encoder_stages, k) for k in range(encoder_stages)]
    layers += [stage_layers(dec, n - encoder_stages, k) for k in range(n - encoder_stages)]
    return PipelineLayout(pp, virtual_stages, encoder_stages, tuple(layers))


class _Stage(_LanguageModel):
    """What the stages share: the layout, this rank's chunks, the embedding copies."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layout: PipelineLayout):
        super().__init__(cfg, ctx)
        if ctx.sequence_parallel:
            raise ValueError("sequence parallelism with pipeline stages is not yet supported")
        self.layout = layout
        self.pp_rank = ctx.pp_rank
        self.virtual_stages = layout.virtual_stages
        self.chunks = [layout.virtual(self.pp_rank, c) for c in range(layout.virtual_stages)]
        self.last_virtual = layout.n_virtual - 1
        self.first, self.last = 0 in self.chunks, self.last_virtual in self.chunks
        self.embed_group: dist.ProcessGroup | None = None  # set by build_stage
        if self.pp_rank not in self.embedding_ranks(layout, cfg):
            self.embed = None
        if not self.last:
            self.lm_head = None

    @staticmethod
    def embedding_ranks(layout: PipelineLayout, cfg: ModelConfig) -> list[int]:
        """The pipeline ranks holding a copy of the embedding table, sorted."""
        users = {0}
        if layout.encoder_stages:
            users.add(layout.encoder_stages)  # the first decoder stage embeds its tokens
        if cfg.tie_embeddings:
            users.add(layout.n_virtual - 1)  # the output projection
        return sorted({layout.rank_of(k) for k in users})

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
        """Sum the embedding gradients over the ranks holding a copy of the table."""
        if self.embed_group is not None and self.embed is not None:
            if self.embed.weight.grad is None:
                self.embed.weight.grad = torch.zeros_like(self.embed.weight)
            all_reduce_tensors([self.embed.weight.grad], self.embed_group)


class DecoderStage(_Stage):
    """This rank's chunks of :class:`~megarch.model.transformer.DecoderLM` (CD or ND)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext,
                 layout: PipelineLayout | None = None):
        if cfg.is_encoder_decoder:
            raise ValueError("DecoderStage needs arch causal_decoder or nonc_decoder")
        super().__init__(cfg, ctx, layout or pipeline_layout(cfg, ctx.pp))
        self.mask_mode = MaskMode.CAUSAL if cfg.arch == "causal_decoder" else MaskMode.PREFIX
        self.blocks = nn.ModuleDict({
            str(i): SelfAttentionBlock(cfg, cfg.decoder_rel_bidirectional, tp_group=self.tp_group)
            for k in self.chunks for i in self.layout.layers[k]
        })
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.last else None

    def input_shapes(self, virtual: int, batch: dict) -> list[tuple[int, ...]]:
        """The hidden state [batch, len, d_model] (nothing for virtual stage 0)."""
        return [(*batch["tokens"].shape, self.cfg.d_model)] if virtual > 0 else []

    def forward(self, batch: dict, inputs: tuple[torch.Tensor, ...] = (),
                chunk: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Model chunk ``chunk`` on ``batch``: from ``batch["tokens"]`` (virtual stage 0) or
        ``inputs = (hidden,)``. Returns ``(hidden,)``, or on the last stage the logits."""
        virtual = self.chunks[chunk]
        tokens = batch["tokens"]
        positions = _default_positions(tokens, batch.get("positions"))
        segment_ids = batch.get("segment_ids")
        prefix = None
        if self.mask_mode == MaskMode.PREFIX:
            prefix = batch.get("prefix_len")
            prefix = prefix if prefix is not None else tokens.new_zeros(tokens.shape[0])
        x = self.dropout(self.embed_tokens(tokens)) if virtual == 0 else inputs[0]
        for i in self.layout.layers[virtual]:
            x = self.run_block(self.blocks[str(i)], x, self.mask_mode, positions, segment_ids,
                               prefix)
        if virtual == self.last_virtual:
            return self.logits(self.dropout(self.final_norm(x)))  # [batch, len, vocab]
        return (x,)  # [batch, len, d_model]


class EncoderDecoderStage(_Stage):
    """This rank's chunks of :class:`~megarch.model.transformer.EncoderDecoderLM`."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext,
                 layout: PipelineLayout | None = None):
        if not cfg.is_encoder_decoder:
            raise ValueError("EncoderDecoderStage needs arch encoder_decoder")
        super().__init__(cfg, ctx, layout or pipeline_layout(cfg, ctx.pp))
        enc = [k for k in self.chunks if self.layout.is_encoder(k)]
        dec = [k for k in self.chunks if not self.layout.is_encoder(k)]
        self.encoder_blocks = nn.ModuleDict({
            str(i): SelfAttentionBlock(cfg, bidirectional_buckets=True, tp_group=self.tp_group)
            for k in enc for i in self.layout.layers[k]
        })
        holds_norm = self.layout.encoder_stages - 1 in self.chunks
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if holds_norm else None
        self.decoder_blocks = nn.ModuleDict({
            str(i): CrossAttentionBlock(cfg, tp_group=self.tp_group)
            for k in dec for i in self.layout.layers[k]
        })
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.last else None

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

    def forward(self, batch: dict, inputs: tuple[torch.Tensor, ...] = (),
                chunk: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Model chunk ``chunk`` on ``batch`` given ``inputs`` (see :meth:`input_shapes`).
        Returns ``(encoder hidden,)``, ``(encoder output,)`` (last encoder stage),
        ``(decoder hidden, encoder output)``, or on the last stage the logits."""
        virtual = self.chunks[chunk]
        if self.layout.is_encoder(virtual):
            return self._encode(batch, inputs, virtual)
        tokens = batch["decoder_tokens"]
        positions = _default_positions(tokens, batch.get("decoder_positions"))
        segment_ids = batch.get("decoder_segment_ids")
        encoder_segment_ids = batch.get("encoder_segment_ids")
        if virtual == self.layout.encoder_stages:  # the first decoder stage
            encoder_out = inputs[0]
            x = self.dropout(self.embed_tokens(tokens))  # [batch, dec_len, d_model]
        else:
            x, encoder_out = inputs
        for i in self.layout.layers[virtual]:
            x = self.run_block(self.decoder_blocks[str(i)], x, positions, segment_ids,
                               encoder_out, encoder_segment_ids)
        if virtual == self.last_virtual:
            return self.logits(self.dropout(self.decoder_norm(x)))  # [batch, dec_len, vocab]
        return x, encoder_out  # the encoder output passes on (its gradient comes back)

    def _encode(self, batch: dict, inputs: tuple[torch.Tensor, ...],
                virtual: int) -> tuple[torch.Tensor]:
        tokens = batch["encoder_tokens"]
        positions = _default_positions(tokens, batch.get("encoder_positions"))
        segment_ids = batch.get("encoder_segment_ids")
        x = self.dropout(self.embed_tokens(tokens)) if virtual == 0 else inputs[0]
        for i in self.layout.layers[virtual]:
            x = self.run_block(self.encoder_blocks[str(i)], x, MaskMode.BIDIRECTIONAL,
                               positions, segment_ids)
        if virtual == self.layout.encoder_stages - 1:
            return (self.dropout(self.encoder_norm(x)),)  # the encoder output
        return (x,)  # [batch, enc_len, d_model]


def _embedding_groups(ctx: ParallelContext, ranks: list[int]) -> dist.ProcessGroup | None:
    """Create the embedding group of every pipeline (collective) and return this rank's."""
    if len(ranks) < 2:
        return None
    mine = None
    size = ctx.tp * ctx.dp
    for position in range(size):  # the (dp, tp) position of one pipeline
        members = [r * size + position for r in ranks]
        group = ctx.new_group(members)
        if ctx.rank in members:
            mine = group
    return mine


def build_stage(cfg: ModelConfig, ctx: ParallelContext, device: torch.device | str = "cpu",
                *, virtual_stages: int = 1, encoder_stages: int = 0,
                seed: int | None = None) -> _Stage:
    """This rank's stage (see the module docstring), built on the meta device and initialised
    on ``device`` with the weights the whole model of ``seed`` has. Under
    ``torch.distributed`` (``ctx.pp_group`` set) it is collective (the embedding groups).
    ``virtual_stages`` and ``encoder_stages`` are the
    :class:`~megarch.config.train.ParallelConfig` fields of the same names."""
    layout = pipeline_layout(cfg, ctx.pp, virtual_stages, encoder_stages)
    cls = EncoderDecoderStage if cfg.is_encoder_decoder else DecoderStage
    with torch.device("meta"):
        stage = cls(cfg, ctx, layout)
    if torch.device(device).type != "meta":
        stage.to_empty(device=device)
        stage.init_weights(seed)
    if ctx.pp_group is not None and ctx.pp > 1:
        stage.embed_group = _embedding_groups(ctx, _Stage.embedding_ranks(layout, cfg))
    return stage


__all__ = [
    "DecoderStage",
    "EncoderDecoderStage",
    "PipelineLayout",
    "build_stage",
    "forward_only",
    "interleaved_one_f_one_b",
    "one_f_one_b",
    "pipeline_layout",
    "stage_layers",
]
