"""Named model presets: the study's full-scale models and small versions of them.

Names are ``<arch>_<size>`` with the paper's abbreviations: ``cd`` causal decoder, ``nd``
non-causal decoder, ``ed`` encoder-decoder.

- ``cd_4.8b``, ``nd_4.8b``: 24 layers, d_model 4096, 64 heads x 64, GEGLU d_ff 10240,
  vocabulary 32,128 (~4.8B parameters, PAPER.md).
- ``ed_11b``: the same blocks, 24 encoder + 24 decoder layers (~11.0B).
- ``*_small``: d_model 512, 8 heads x 64, d_ff 1024, 8 layers (per stack), the T5 vocabulary:
  a GPU smoke-test size.
- ``*_tiny``: d_model 64, 4 heads x 16, d_ff 128, 2 layers, a 512-token vocabulary: trains on
  a CPU in seconds (use a tokenizer whose vocabulary fits, or override ``--model.vocab_size``).
- ``ed_t5_v1_1_<size>`` (small, base, large, xl, xxl): Google's T5 v1.1 encoder-decoders exactly
  as Hugging Face's ``google/t5-v1_1-<size>`` configs (untied output layer, one bias table per
  stack, so ``megarch-convert`` maps them both ways): 76.9M, 247.6M, 783.2M, 2.85B, 11.14B
  parameters. ``cd_t5_v1_1_<size>`` / ``nd_t5_v1_1_<size>``: the decoder-only model of the
  same compute per token, the study's pairing (its 4.8B decoders with the 11B ED): the same
  blocks, as many layers as the encoder, one stack instead of two (cross-attention aside).
"""

from __future__ import annotations

from collections.abc import Callable

from megarch.config.model import ModelConfig
from megarch.config.overrides import ConfigError

_ARCH = {"cd": "causal_decoder", "nd": "nonc_decoder", "ed": "encoder_decoder"}


def study_model(arch: str) -> ModelConfig:
    """The study's full-scale model of ``arch`` (PAPER.md): ~4.8B decoders, ~11.0B ED."""
    return ModelConfig(
        arch=arch, vocab_size=32128, d_model=4096, n_heads=64, head_dim=64, d_ff=10240,
        n_layers=24, n_decoder_layers=24 if arch == "encoder_decoder" else None,
    )


def small_model(arch: str) -> ModelConfig:
    """A T5-small-sized model of ``arch`` with the study's vocabulary."""
    return ModelConfig(
        arch=arch, vocab_size=32128, d_model=512, n_heads=8, head_dim=64, d_ff=1024,
        n_layers=8, n_decoder_layers=8 if arch == "encoder_decoder" else None,
    )


def tiny_model(arch: str) -> ModelConfig:
    """A model of ``arch`` that trains on one CPU in seconds."""
    return ModelConfig(
        arch=arch, vocab_size=512, d_model=64, n_heads=4, head_dim=16, d_ff=128,
        n_layers=2, n_decoder_layers=2 if arch == "encoder_decoder" else None,
    )


T5_V1_1 = {  # d_model, n_heads, d_ff, layers per stack (head_dim 64): HF google/t5-v1_1-*
    "small": (512, 6, 1024, 8),
    "base": (768, 12, 2048, 12),
    "large": (1024, 16, 2816, 24),
    "xl": (2048, 32, 5120, 24),
    "xxl": (4096, 64, 10240, 24),
}


def t5_v1_1_model(size: str, arch: str = "encoder_decoder") -> ModelConfig:
    """T5 v1.1 ``size`` (:data:`T5_V1_1`); a decoder-only ``arch`` gives the same blocks in one
    stack of the encoder's depth (the study's bias table per layer)."""
    d_model, n_heads, d_ff, layers = T5_V1_1[size]
    ed = arch == "encoder_decoder"
    return ModelConfig(
        arch=arch, vocab_size=32128, d_model=d_model, n_heads=n_heads, head_dim=64, d_ff=d_ff,
        n_layers=layers, n_decoder_layers=layers if ed else None, rel_bias_shared=ed,
        tie_embeddings=False,
    )


def _presets() -> dict[str, Callable[[], ModelConfig]]:
    sizes = {"4.8b": study_model, "small": small_model, "tiny": tiny_model}
    table: dict[str, Callable[[], ModelConfig]] = {}
    for short, arch in _ARCH.items():
        for size, make in sizes.items():
            if short == "ed" and size == "4.8b":
                size = "11b"
            table[f"{short}_{size}"] = lambda make=make, arch=arch: make(arch)
    for size in T5_V1_1:
        for short, arch in _ARCH.items():
            table[f"{short}_t5_v1_1_{size}"] = (
                lambda size=size, arch=arch: t5_v1_1_model(size, arch))
    return table


MODEL_PRESETS: tuple[str, ...] = tuple(_presets())
"""Every model preset name, for ``--preset`` help and validation."""


def get_model_preset(name: str) -> ModelConfig:
    """A fresh, validated :class:`ModelConfig` for preset ``name`` (see :data:`MODEL_PRESETS`)."""
    table = _presets()
    if name not in table:
        raise ConfigError(f"unknown model preset {name!r}: use one of {', '.join(table)}")
    return table[name]().validate()
