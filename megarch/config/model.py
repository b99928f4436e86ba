"""The model config: which architecture, how wide and deep, which position encoding.

Defaults are the study's full-scale decoder (PAPER.md): 24 layers, d_model 4096, 64 heads of
64, GEGLU d_ff 10240, T5 relative position bias, vocabulary 32,128. Named presets, including
tiny CPU-sized ones, live in :mod:`megarch.config.presets`.

Head size: ``head_dim`` may be given explicitly, in which case ``n_heads * head_dim`` need not
equal ``d_model`` (T5 allows an attention inner size different from d_model); when it is left
``None`` it is derived as ``d_model // n_heads`` and ``d_model`` must then be divisible by
``n_heads``.

Grouped-query attention: ``n_kv_heads`` (a divisor of ``n_heads``; None = ``n_heads``) sets how
many key/value heads the k and v projections (self- and cross-attention) produce; each serves
``n_heads / n_kv_heads`` consecutive query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarch.config.overrides import ConfigError

ARCHS = ("causal_decoder", "nonc_decoder", "encoder_decoder")
POSITIONS = ("t5_relative", "rotary")


@dataclass
class ModelConfig:
    """Shape and options of one transformer LM (see megarch.model)."""

    arch: str = "causal_decoder"
    """causal_decoder (CD), nonc_decoder (ND: bidirectional prefix) or encoder_decoder (ED)."""
    vocab_size: int = 32128
    """Embedding rows: the study's T5 SentencePiece vocabulary (32,100 pieces) padded to 32,128."""
    d_model: int = 4096
    """Width of the residual stream."""
    n_heads: int = 64
    """Attention heads per layer."""
    n_kv_heads: int | None = None
    """Key/value heads per layer, a divisor of n_heads (None = n_heads: multi-head attention;
    fewer: grouped-query attention, query head h reading KV head h // (n_heads / n_kv_heads);
    1: multi-query attention)."""
    head_dim: int | None = None
    """Size of one head; None derives d_model // n_heads (d_model must then divide evenly)."""
    d_ff: int = 10240
    """Hidden size of the GEGLU feed-forward (each of its gate and up projections)."""
    n_layers: int = 24
    """Decoder-only: the number of layers; encoder-decoder: the number of encoder layers."""
    n_decoder_layers: int | None = None
    """Encoder-decoder only: decoder layers (None = n_layers)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities, FFN hidden, block outputs (T5 places)."""
    rel_buckets: int = 32
    """T5 relative position bias: number of buckets."""
    rel_max_distance: int = 128
    """T5 relative position bias: distances from here on share the last bucket."""
    decoder_rel_bidirectional: bool = False
    """Decoder-only bias buckets: False (T5X decoder_only, the study) gives causal buckets to CD
    and ND alike; True gives both bidirectional buckets. Never differs between CD and ND, so the
    two stay one network (adaptation only changes the mask)."""
    position: str = "t5_relative"
    """t5_relative (a learned bias table per layer) or rotary (on queries and keys)."""
    rel_bias_shared: bool = False
    """t5_relative only: one bias table per stack, held by its first layer and read by all its
    layers (Hugging Face / Mesh-TF T5); False: a table per layer (T5X, the study). Not with
    pipeline parallelism (a stage without the first layer would lack the table)."""
    rotary_base: float = 10000.0
    """Rotary only: the frequency base."""
    norm_eps: float = 1e-6
    """Epsilon of the RMS "T5 LayerNorm"."""
    tie_embeddings: bool = True
    """Use the input embedding as the output projection (logits scaled by d_model**-0.5)."""
    init_std: float = 1.0
    """Init scale: embeddings ~ N(0, init_std^2), each linear ~ N(0, init_std^2 / fan_in)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    z_loss: float = 1e-4
    """Coefficient of the z-loss, mean(logsumexp(logits)^2) over loss tokens."""

    @property
    def kv_dim(self) -> int:
        """The resolved head size (``head_dim`` or ``d_model // n_heads``)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The resolved number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def decoder_layers(self) -> int:
        """Encoder-decoder decoder depth (``n_decoder_layers`` or ``n_layers``)."""
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def is_encoder_decoder(self) -> bool:
        """True for the encoder-decoder architecture."""
        return self.arch == "encoder_decoder"

    def validate(self) -> ModelConfig:
        """Refuse impossible settings with the field names and the fix; return self."""
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch={self.arch!r}: use one of {ARCHS}")
        if self.position not in POSITIONS:
            raise ConfigError(f"model.position={self.position!r}: use one of {POSITIONS}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)}: must be >= 1")
        self._validate_heads()
        if self.n_decoder_layers is not None:
            if not self.is_encoder_decoder:
                raise ConfigError(
                    f"model.n_decoder_layers={self.n_decoder_layers} with model.arch={self.arch}: "
                    "only encoder_decoder has a separate decoder; set model.n_layers instead"
                )
            if self.n_decoder_layers < 1:
                raise ConfigError(f"model.n_decoder_layers={self.n_decoder_layers}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: must be in [0, 1)")
        if self.position == "t5_relative":
            self._validate_buckets()
        elif self.rel_bias_shared:
            raise ConfigError("model.rel_bias_shared=true needs model.position=t5_relative "
                              "(rotary has no bias table): set it false")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.z_loss < 0:
            raise ConfigError(
                "model.norm_eps and model.init_std must be > 0 and model.z_loss >= 0 "
                f"(got {self.norm_eps}, {self.init_std}, {self.z_loss})"
            )
        return self

    def _validate_heads(self) -> None:
        if self.n_kv_heads is not None and (self.n_kv_heads < 1
                                            or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must be a divisor of "
                f"model.n_heads={self.n_heads} (each KV head serves an equal group of query "
                "heads): pick one, e.g. 1 (multi-query), or leave it unset for n_heads"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                "change one of them or set model.head_dim explicitly"
            )
        if self.kv_dim < 1:
            raise ConfigError(f"model.head_dim={self.head_dim}: must be >= 1")
        if self.position == "rotary" and self.kv_dim % 2:
            raise ConfigError(
                f"model.position=rotary needs an even head size, got {self.kv_dim}: "
                "change model.head_dim (or model.d_model / model.n_heads)"
            )

    def validate_tp(self, tp: int) -> None:
        """Refuse a tensor-parallel size that does not divide the sharded dimensions (the
        vocabulary, the query and key/value heads, the feed-forward units)."""
        for name in ("vocab_size", "n_heads", "d_ff"):
            if getattr(self, name) % tp:
                raise ConfigError(f"model.{name}={getattr(self, name)} is not divisible by "
                                  f"parallel.tp={tp}: change one of them")
        if self.kv_heads % tp:
            raise ConfigError(
                f"model.n_kv_heads={self.kv_heads} is not divisible by parallel.tp={tp}: each "
                "rank holds whole KV heads with their query-head groups; use a tp that divides "
                "model.n_kv_heads, or raise model.n_kv_heads"
            )

    def _validate_buckets(self) -> None:
        # Bidirectional bucketing gives each direction rel_buckets // 2 buckets, half of them
        # exact: at least 2 exact buckets per direction, and logarithmic ones beyond them.
        if self.rel_buckets < 4 or self.rel_buckets % 2:
            raise ConfigError(f"model.rel_buckets={self.rel_buckets}: use an even number >= 4")
        if self.rel_max_distance <= self.rel_buckets // 2:
            raise ConfigError(
                f"model.rel_max_distance={self.rel_max_distance} must exceed "
                f"model.rel_buckets // 2 = {self.rel_buckets // 2}: raise it"
            )
