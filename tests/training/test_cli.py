"""``megarch-train``: config errors exit 2 with one line; a run prints, saves and logs."""

from __future__ import annotations

import json
import logging
import os

import pytest

from megarch.config.train import TRAIN_PRESETS, config_from_json
from megarch.train import main
from megarch.training import load_model
from megarch.training.logging import RankFilter
from tests.training.helpers import fast_args


@pytest.mark.parametrize("args,expected", [
    (["--run.global_batch", "10", "--run.micro_batch", "4"], "run.global_batch=10"),
    (["--model.n_layer", "4"], "no field 'n_layer'"),
    (["--data.layout", "encoder_decoder"], "data.layout"),
    (["--parallel.pp", "2"], "parallel.pp=2"),  # more: tests/parallel/test_config.py
    (["--data.paths", "/nonexistent/c4", "--data.tokenizer", "bytes"], "/nonexistent/c4"),
])
def test_config_errors_exit_2_with_one_line(args, expected, capsys, tmp_path):
    assert main(["--preset", "cd_flm_tiny", "-q", "--run.out_dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megarch-train: error:") and expected in err
    assert len(err.splitlines()) == 1


def test_vocab_smaller_than_tokenizer_exits_2(embedded, tmp_path, capsys):
    args = fast_args(embedded, str(tmp_path), 2) + ["--model.vocab_size", "1024"]
    assert main(["--preset", "cd_flm_tiny", "-q", *args]) == 2
    assert "model.vocab_size=1024" in capsys.readouterr().err


def test_list_presets(capsys):
    assert main(["--list-presets"]) == 0
    assert capsys.readouterr().out.split() == list(TRAIN_PRESETS)


def test_run_prints_config_and_summary_and_saves_it(embedded, tmp_path, capsys):
    out_dir = str(tmp_path)
    args = fast_args(embedded, out_dir, 3, run__log_every="1", run__eval_batches="1")
    assert main(["--preset", "ed_plm_tiny", *args]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"): out.index("\n}\n") + 2])
    assert printed["model"]["arch"] == "encoder_decoder" and printed["run"]["steps"] == 3
    assert printed["model"]["vocab_size"] == 2048
    assert "step 3/3 | loss" in out and "tok/s" in out and "valid loss" in out
    assert "final loss" in out and "step_00000003" in out
    saved = config_from_json(open(os.path.join(out_dir, "checkpoints", "step_00000003",
                                               "config.json")).read())
    assert saved.model.vocab_size == 2048  # 0 resolved: 2000 padded to a multiple of 128
    assert saved.data.seq_len == 64
    model, cfg = load_model(os.path.join(out_dir, "checkpoints", "step_00000003"))
    assert cfg == saved and type(model).__name__ == "EncoderDecoderLM" and not model.training
    events = os.listdir(os.path.join(out_dir, "tb"))
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_rank_filter_keeps_only_warnings_off_rank_0():
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    warning = logging.LogRecord("x", logging.WARNING, __file__, 1, "careful", None, None)
    assert RankFilter(rank=0).filter(info)
    assert not RankFilter(rank=1).filter(info)
    assert RankFilter(rank=1).filter(warning) and warning.msg == "[rank 1] careful"


def test_resuming_a_checkpoint_of_another_shape_names_the_field(embedded, tmp_path, capsys):
    args = fast_args(embedded, str(tmp_path), 1)
    assert main(["--preset", "cd_flm_tiny", "-q", *args]) == 0
    capsys.readouterr()
    assert main(["--preset", "cd_flm_tiny", "-q", *args, "--run.steps", "2",
                 "--model.d_ff", "96"]) == 2
    assert "model.d_ff=128 there, 96 here" in capsys.readouterr().err
