"""Adaptation (LM-A, NC-A): every weight kept, only the mask and the data change, lineage."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megarch.config.overrides import ConfigError
from megarch.config.train import get_train_preset
from megarch.train import main as train_main
from megarch.training.adapt import (
    StagedTrainer,
    adapt_config,
    config_diff,
    load_adapt_config,
    read_checkpoint_config,
)
from megarch.training.checkpoint import find_latest, read_lineage, read_state


def _adapt_args(kind: str, parent: str, out_dir: str, steps: int, *extra: str) -> list[str]:
    return ["--adapt", kind, "--run.init_from", parent, "--run.out_dir", out_dir,
            "--run.steps", str(steps), "-q", *extra]


@pytest.mark.parametrize("kind,parent_fixture", [("lm-a", "nd_mlm_run"), ("nc-a", "cd_flm_run")])
def test_adaptation_keeps_every_weight_and_changes_only_mask_and_data(
        kind, parent_fixture, request, tmp_path):
    parent_dir = request.getfixturevalue(parent_fixture)
    checkpoint = find_latest(parent_dir)
    cfg = load_adapt_config(kind, ["--run.init_from", parent_dir, "--run.out_dir",
                                   str(tmp_path), "--run.steps", "6"])
    parent = read_checkpoint_config(checkpoint)
    diff = config_diff(parent, cfg)
    target = {"lm-a": ("causal_decoder", "flm"), "nc-a": ("nonc_decoder", "mlm")}[kind]
    assert diff == {"model.arch": (parent.model.arch, target[0]),
                    "data.objective": (parent.data.objective, target[1])}
    trainer = StagedTrainer(cfg)
    trainer.resume()
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    loaded = trainer.model.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name
    assert trainer.state.step == read_state(checkpoint).step == 4  # the schedule continues
    assert trainer.state.consumed_samples == 0  # a new data stream
    assert trainer.optimizer.state, "the optimizer state should be restored"


def test_lm_a_cli_trains_and_records_lineage(nd_mlm_run, tmp_path, capsys):
    out = str(tmp_path / "lm_a")
    assert train_main(_adapt_args("lm-a", nd_mlm_run, out, 6)) == 0
    checkpoint = find_latest(out)
    assert read_state(checkpoint).step == 6
    lineage = read_lineage(checkpoint)
    parent = read_state(find_latest(nd_mlm_run))
    first, second = lineage["stages"]
    assert (first["stage"], first["arch"], first["objective"]) == ("pretrain", "nonc_decoder",
                                                                   "mlm")
    assert first["tokens"] == parent.tokens_seen and first["end_step"] == 4
    assert (second["stage"], second["arch"], second["objective"]) == ("lm-a", "causal_decoder",
                                                                      "flm")
    assert second["from_checkpoint"] == find_latest(nd_mlm_run) and second["from_step"] == 4
    assert (second["start_step"], second["end_step"]) == (4, 6)
    assert second["tokens"] == read_state(checkpoint).tokens_seen - parent.tokens_seen > 0
    assert lineage["tokens_by_objective"] == {"mlm": first["tokens"], "flm": second["tokens"]}
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f if "loss" in line]
    assert steps == [5, 6]


def test_reset_schedule_starts_at_step_zero(cd_flm_run, tmp_path):
    out = str(tmp_path / "nc_a")
    assert train_main(_adapt_args("nc-a", cd_flm_run, out, 2, "--adapt-reset-schedule")) == 0
    checkpoint = find_latest(out)
    assert read_state(checkpoint).step == 2
    stage = read_lineage(checkpoint)["stages"][-1]
    assert (stage["stage"], stage["start_step"], stage["end_step"]) == ("nc-a", 0, 2)
    assert read_checkpoint_config(checkpoint).run.init_keep_step is False


@pytest.mark.parametrize("preset,kind,reason", [
    ("ed_mlm_tiny", "lm-a", "encoder_decoder"),
    ("ed_plm_tiny", "nc-a", "encoder_decoder"),
    ("cd_flm_tiny", "lm-a", "nonc_decoder+mlm or nonc_decoder+plm"),
    ("nd_mlm_tiny", "nc-a", "causal_decoder+flm"),
    ("cd_mlm_tiny", "nc-a", "not causal_decoder+mlm"),
    ("cd_flm_tiny", "xx-a", "use one of"),
])
def test_unsupported_adaptations_are_refused_with_the_reason(preset, kind, reason):
    with pytest.raises(ConfigError, match=reason.replace("+", r"\+")):
        adapt_config(get_train_preset(preset), kind)


def test_cli_refusals(cd_flm_run, tmp_path, capsys):
    assert train_main(["--adapt", "nc-a", "-q"]) == 2
    assert "needs --run.init_from" in capsys.readouterr().err
    assert train_main(["--preset", "cd_flm_tiny", *_adapt_args("nc-a", cd_flm_run,
                                                               str(tmp_path), 6)]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert train_main(_adapt_args("lm-a", cd_flm_run, str(tmp_path), 6)) == 2
    assert "starts from a nonc_decoder" in capsys.readouterr().err
    assert train_main(_adapt_args("nc-a", cd_flm_run, str(tmp_path / "x"), 4)) == 2
    assert "not above the restored step 4" in capsys.readouterr().err


def test_checkpoint_without_lineage_gets_a_single_stage(embedded, tmp_path):
    from megarch.training.adapt import lineage_of
    from megarch.training.loop import Trainer
    from tests.training.helpers import fast_config

    out = str(tmp_path / "plain")
    Trainer(fast_config("cd_flm_tiny", embedded, out, 2)).train()  # writes no lineage.json
    checkpoint = find_latest(out)
    assert read_lineage(checkpoint) is None
    tokens = read_state(checkpoint).tokens_seen
    lineage = lineage_of(checkpoint)
    assert [(s["stage"], s["objective"], s["end_step"], s["tokens"])
            for s in lineage["stages"]] == [("pretrain", "flm", 2, tokens)]
    assert lineage["tokens_by_objective"] == {"flm": tokens}
