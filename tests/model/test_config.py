"""ModelConfig validation and the model presets."""

import dataclasses
import inspect

import pytest

from megarch.config.model import ModelConfig
from megarch.config.overrides import ConfigError, apply_overrides
from megarch.config.presets import MODEL_PRESETS, get_model_preset


def test_every_field_has_a_docstring():
    source = inspect.getsource(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        line = next(x for x in source.splitlines() if x.strip().startswith(f"{field.name}:"))
        after = source.split(line, 1)[1].lstrip()
        assert after.startswith('"""'), field.name


@pytest.mark.parametrize("changes,words", [
    (dict(arch="gpt"), ["model.arch"]),
    (dict(position="alibi"), ["model.position"]),
    (dict(d_model=100, n_heads=3), ["model.d_model", "model.n_heads", "model.head_dim"]),
    (dict(n_decoder_layers=4), ["model.n_decoder_layers", "model.n_layers"]),
    (dict(dropout=1.0), ["model.dropout"]),
    (dict(rel_buckets=7), ["model.rel_buckets"]),
    (dict(rel_max_distance=16), ["model.rel_max_distance"]),
    (dict(position="rotary", head_dim=7), ["model.position", "model.head_dim"]),
    (dict(n_layers=0), ["model.n_layers"]),
])
def test_validate_names_the_fields(changes, words):
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(ModelConfig(), **changes).validate()
    for word in words:
        assert word in str(info.value)


def test_explicit_head_dim_need_not_match_d_model():
    cfg = ModelConfig(d_model=100, n_heads=3, head_dim=40).validate()
    assert cfg.kv_dim == 40
    assert ModelConfig().kv_dim == 64  # derived 4096 // 64


def test_presets_are_valid_and_overridable():
    assert {"cd_4.8b", "nd_4.8b", "ed_11b", "cd_tiny", "nd_tiny", "ed_tiny"} <= set(MODEL_PRESETS)
    for name in MODEL_PRESETS:
        cfg = get_model_preset(name)
        assert cfg.arch == {"cd": "causal_decoder", "nd": "nonc_decoder",
                            "ed": "encoder_decoder"}[name[:2]]
    cfg = get_model_preset("ed_11b")
    assert (cfg.d_model, cfg.n_heads, cfg.kv_dim, cfg.d_ff, cfg.n_layers, cfg.decoder_layers,
            cfg.vocab_size) == (4096, 64, 64, 10240, 24, 24, 32128)
    apply_overrides(cfg, ["--n_layers", "2"])
    assert cfg.n_layers == 2 and get_model_preset("ed_11b").n_layers == 24  # fresh copies
    with pytest.raises(ConfigError, match="cd_tiny"):
        get_model_preset("cd_huge")
