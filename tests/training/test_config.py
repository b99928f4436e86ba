"""TrainConfig: cross-section validation, presets, JSON + dotted overrides."""

from __future__ import annotations

import json

import pytest

from megarch.config.overrides import ConfigError
from megarch.config.train import (
    STUDY_PAIRS,
    TRAIN_PRESETS,
    TrainConfig,
    config_from_json,
    get_train_preset,
    load_train_config,
)
from megarch.model import build_model, count_parameters


def _conflict(preset: str, **changes) -> str:
    cfg = get_train_preset(preset)
    for dotted, value in changes.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    return str(err.value)


def test_encoder_decoder_needs_encoder_decoder_layout():
    message = _conflict("ed_mlm_tiny", data__layout="decoder")
    assert "model.arch=encoder_decoder" in message and "data.layout" in message


def test_decoders_need_decoder_layout():
    for preset in ("cd_flm_tiny", "nd_plm_tiny"):
        message = _conflict(preset, data__layout="encoder_decoder", data__objective="mlm")
        assert "data.layout=decoder" in message


def test_flm_with_encoder_decoder_refused():
    message = _conflict("ed_plm_tiny", data__objective="flm")
    assert "flm" in message and "encoder_decoder" in message


def test_vocab_smaller_than_tokenizer_refused():
    cfg = get_train_preset("cd_flm_tiny")
    cfg.model.vocab_size = 1024
    with pytest.raises(ConfigError, match=r"model.vocab_size=1024 .*\(2000"):
        cfg.validate(tokenizer_vocab=2000)


def test_vocab_zero_resolves_to_tokenizer_padded_to_128():
    cfg = get_train_preset("cd_flm_tiny").validate(tokenizer_vocab=8000)
    assert cfg.model.vocab_size == 8064
    assert get_train_preset("cd_flm_tiny").validate(tokenizer_vocab=2000).model.vocab_size == 2048


def test_global_batch_not_multiple_of_micro_batch():
    message = _conflict("cd_flm_tiny", run__global_batch=10, run__micro_batch=4)
    assert "run.global_batch=10" in message and "run.micro_batch=4" in message


@pytest.mark.parametrize("field", ["tp", "pp"])  # more: tests/parallel/test_config.py
def test_model_parallel_sizes_must_fit_the_processes(field):
    message = _conflict("cd_flm_tiny", **{f"parallel__{field}": 2})  # one process, no torchrun
    assert f"parallel.{field}=2" in message and "WORLD_SIZE=1" in message


def test_bad_enum_values_name_the_field():
    assert "optim.name" in _conflict("cd_flm_tiny", optim__name="sgd")
    assert "run.on_nonfinite" in _conflict("cd_flm_tiny", run__on_nonfinite="ignore")


@pytest.mark.parametrize("name,arch,objective", STUDY_PAIRS)
def test_study_presets_validate_and_match_the_paper(name, arch, objective):
    cfg = get_train_preset(name).validate(tokenizer_vocab=32100)
    assert (cfg.model.arch, cfg.data.objective, cfg.data.seq_len) == (arch, objective, 626)
    assert cfg.optim.name == "adafactor" and cfg.optim.lr == 0.01
    assert cfg.optim.schedule == "constant" and cfg.run.steps == 131072
    assert cfg.model.z_loss == 1e-4 and cfg.model.dropout == 0.0
    expected_batch = 1024 if name == "ed_plm" else 2048
    assert cfg.run.global_batch == expected_batch
    params = count_parameters(build_model(cfg.model, "meta"))
    paper = 11.0e9 if arch == "encoder_decoder" else 4.8e9  # PAPER.md: ~11.0B, ~4.8B
    assert abs(params - paper) / paper < 0.01, params


def test_every_preset_validates():
    for name in TRAIN_PRESETS:
        get_train_preset(name).validate()
    with pytest.raises(ConfigError, match="unknown training preset"):
        get_train_preset("cd_xyz")


def test_json_file_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"n_layers": 3}, "run": {"steps": 7, "seed": 5}}))
    cfg = load_train_config("nd_mlm_tiny", str(path), ["--run.steps", "9", "--model.d_ff=96"])
    assert (cfg.model.n_layers, cfg.run.steps, cfg.run.seed, cfg.model.d_ff) == (3, 9, 5, 96)
    assert cfg.model.arch == "nonc_decoder"
    path.write_text(json.dumps({"run": {"stpes": 7}}))
    with pytest.raises(ConfigError, match="run.stpes: unknown field"):
        load_train_config("nd_mlm_tiny", str(path), [])


def test_json_round_trip():
    cfg = get_train_preset("ed_plm_tiny")
    cfg.optim.betas = [0.8, 0.9]
    assert config_from_json(cfg.to_json()) == cfg
    assert config_from_json(TrainConfig().to_json()) == TrainConfig()
