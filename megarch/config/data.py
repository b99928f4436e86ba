"""The data config: which datasets, which objective and layout, how long a row is."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarch.config.overrides import ConfigError

OBJECTIVES = ("flm", "plm", "mlm", "multitask")
LAYOUTS = ("decoder", "encoder_decoder")


@dataclass
class DataConfig:
    """Where the tokens come from and how they become samples (see megarch.data.samples)."""

    paths: list[str] = field(default_factory=list)
    """Dataset prefixes as written by ``megarch-data preprocess`` (``OUT`` of ``--output OUT``),
    or full ``..._text_document`` prefixes."""
    weights: list[float] | None = None
    """Blend weights, one per path (default: by token count)."""
    tokenizer: str = "bytes"
    """Tokenizer spec: 'bytes', a SentencePiece .model, or a tokenizer.json."""
    objective: str = "flm"
    """flm (full LM), plm (prefix LM), mlm (T5 span corruption) or multitask (prompted pairs)."""
    layout: str = "decoder"
    """decoder (one sequence) or encoder_decoder (inputs to the encoder, targets to the decoder)."""
    seq_len: int = 626
    """Tokens per row: the decoder length; for encoder-decoder PLM each side's length; for MLM
    the inputs + targets budget (626 gives 512 inputs and 114 targets)."""
    text_key: str = "text"
    """The json key the pretraining datasets were preprocessed from."""
    split: str = "969,30,1"
    """Shares of documents for train, valid, test (contiguous ranges)."""
    seed: int = 1234
    """Seed of the document order, the sample shuffle and every per-sample choice."""
    noise_density: float = 0.15
    """MLM: fraction of raw tokens masked."""
    mean_noise_span: float = 3.0
    """MLM: mean length of a masked span."""
    segment_docs: bool = False
    """FLM: per-document segment ids and positions (the study lets attention cross documents)."""
    inputs_len: int = 1024
    """Multitask: most input tokens per example (longer inputs are truncated) and, for
    encoder-decoder, the encoder row length."""
    targets_len: int = 256
    """Multitask: most target tokens per example and, for encoder-decoder, the decoder row."""
    cache_dir: str | None = None
    """Where sample indices are cached (default: ``index-cache`` beside the first dataset)."""
    num_workers: int = 2
    """Data-loader worker processes."""
    mixture_cap: int = 0
    """Blend data.paths by examples (documents of the train split) capped at this, as T0's
    mixture (500,000); 0: by data.weights or token count. Resolved into data.weights by
    megarch.training.adapt.resolve_mixture (megarch-train, megarch-study)."""

    def validate(self) -> None:
        """Refuse impossible settings with the field names and the fix."""
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"data.objective={self.objective!r}: use one of {OBJECTIVES}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout={self.layout!r}: use one of {LAYOUTS}")
        if self.objective == "flm" and self.layout == "encoder_decoder":
            raise ConfigError(
                "data.objective=flm with data.layout=encoder_decoder: full language modeling "
                "has no inputs for an encoder; use objective plm or mlm for encoder-decoders"
            )
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths"
            )
        minimum = {"flm": 1, "plm": 2, "mlm": 8, "multitask": 2}[self.objective]
        if self.seq_len < minimum:
            raise ConfigError(
                f"data.seq_len={self.seq_len} leaves no room for {self.objective} targets "
                f"(need >= {minimum})"
            )
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"data.noise_density={self.noise_density}: must be in (0, 1)")
        if self.mean_noise_span < 1.0:
            raise ConfigError(f"data.mean_noise_span={self.mean_noise_span}: must be >= 1")
        if self.mixture_cap < 0:
            raise ConfigError(f"data.mixture_cap={self.mixture_cap}: must be >= 0 (0: no cap)")
        if self.inputs_len < 1 or self.targets_len < 1:
            raise ConfigError("data.inputs_len and data.targets_len must be >= 1")
