"""How the model is cut into pipeline stages: which blocks each virtual stage holds.

The model owns its structure: :class:`~megarch.model.transformer.DecoderLM` and
:class:`~megarch.model.transformer.EncoderDecoderLM` build exactly the parts of themselves that a
:class:`PipelineLayout` gives a pipeline rank, from their own forward code, and the whole model is
the one-stage layout (:func:`whole_model`). So one training step, clip and evaluation path
serves every layout (megarch.training.loop), and megarch.parallel only moves tensors between
the stages (megarch.parallel.pipeline_schedules).

The model is cut into ``pp * virtual_stages`` *virtual stages*, each a run of consecutive
blocks. Rank ``r`` of the pipeline holds virtual stages ``r, r + pp, r + 2 pp, ...`` (its *model
chunks*, Megatron's interleaved assignment; one chunk when ``virtual_stages = 1``), in ONE module
whose parameter names are the single-process model's (``blocks.<global index>...``,
``encoder_blocks.<i>``, ``decoder_blocks.<i>``), so a full state dict loads into a stage by name
and stage checkpoints merge by name.

- Decoder-only: virtual stage 0 embeds the tokens, the last one applies the final norm and the
  output projection; the hidden state [batch, len, d_model] travels.
- Encoder-decoder: a virtual stage holds a run of encoder blocks or a run of decoder blocks
  (the first ``encoder_stages`` the encoder's), or, as the whole model, both. The stage ending
  the encoder applies the encoder's final norm; the
  encoder output travels from there to every decoder stage, carried with the decoder hidden
  state ([batch, dec_len, d_model] and [batch, enc_len, d_model]); its gradient flows back
  summed over the decoder stages using it.

The embedding table is held by the rank of virtual stage 0, (encoder-decoder) the rank of the
first decoder stage, and (tied embeddings) the rank of the last stage (:func:`embedding_ranks`).
The copies start equal (initialisation is keyed by parameter name) and their gradients are
summed over the ranks holding one after the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarch.config.model import ModelConfig


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
    """Virtual stages holding encoder blocks (0 for decoder-only models; 1 for the whole
    encoder-decoder, whose one stage holds both stacks)."""
    layers: tuple[range, ...]
    """Per virtual stage, the global indices of its blocks (encoder or decoder numbering)."""
    whole_decoder: range = range(0)
    """The whole encoder-decoder only: the decoder blocks its one stage also holds."""

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

    def chunks(self, pp_rank: int) -> list[int]:
        """The virtual stages of ``pp_rank``, in chunk order."""
        return [self.virtual(pp_rank, c) for c in range(self.virtual_stages)]

    def is_encoder(self, virtual: int) -> bool:
        """True on a virtual stage holding encoder blocks."""
        return virtual < self.encoder_stages

    def encoder_layers(self, virtual: int) -> range:
        """The encoder blocks of ``virtual`` (none on decoder stages and decoder-only models)."""
        return self.layers[virtual] if self.is_encoder(virtual) else range(0)

    def decoder_layers(self, virtual: int) -> range:
        """The decoder blocks of ``virtual`` (of an encoder-decoder): its ``layers`` on a
        decoder stage, the whole decoder on the one stage of the whole model."""
        if self.n_virtual == 1 and self.encoder_stages:
            return self.whole_decoder
        return range(0) if self.is_encoder(virtual) else self.layers[virtual]

    @property
    def first_decoder(self) -> int:
        """The virtual stage that embeds the decoder tokens (encoder-decoders)."""
        return min(self.encoder_stages, self.n_virtual - 1)


def whole_model(cfg: ModelConfig) -> PipelineLayout:
    """The one-stage layout: every block, the embedding, the final norm(s) and the head."""
    if cfg.is_encoder_decoder:
        return PipelineLayout(1, 1, 1, (range(cfg.n_layers),), range(cfg.decoder_layers))
    return PipelineLayout(1, 1, 0, (range(cfg.n_layers),))


def pipeline_layout(cfg: ModelConfig, pp: int, virtual_stages: int = 1,
                    encoder_stages: int = 0) -> PipelineLayout:
    """The split of ``cfg``'s blocks over ``pp * virtual_stages`` virtual stages (one stage:
    :func:`whole_model`).

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
    if n == 1:
        if encoder_stages > 1:
            raise ValueError(f"parallel.encoder_stages={encoder_stages} with one pipeline stage: "
                             "set 0")
        return whole_model(cfg)
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


def embedding_ranks(layout: PipelineLayout, cfg: ModelConfig) -> list[int]:
    """The pipeline ranks holding a copy of the embedding table, sorted."""
    users = {0}
    if layout.encoder_stages:
        users.add(layout.first_decoder)  # the first decoder stage embeds its tokens
    if cfg.tie_embeddings:
        users.add(layout.n_virtual - 1)  # the output projection
    return sorted({layout.rank_of(k) for k in users})
