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


def _presets() -> dict[str, Callable[[], ModelConfig]]:
    sizes = {"4.8b": study_model, "small": small_model, "tiny": tiny_model}
    table: dict[str, Callable[[], ModelConfig]] = {}
    for short, arch in _ARCH.items():
        for size, make in sizes.items():
            if short == "ed" and size == "4.8b":
                size = "11b"
            table[f"{short}_{size}"] = lambda make=make, arch=arch: make(arch)
    return table


MODEL_PRESETS: tuple[str, ...] = tuple(_presets())
"""Every model preset name, for ``--preset`` help and validation."""


def get_model_preset(name: str) -> ModelConfig:
    """A fresh, validated :class:`ModelConfig` for preset ``name`` (see :data:`MODEL_PRESETS`)."""
    table = _presets()
    if name not in table:
        raise ConfigError(f"unknown model preset {name!r}: use one of {', '.join(table)}")
    return table[name]().validate()
