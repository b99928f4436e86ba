"""Checkpoints: round trip, atomicity (temporary dirs ignored), keep-last, RNG states; the
resharding tool (TP1 x PP1 -> TP2 x PP2 -> TP1 x PP1 bit for bit, AdamW and Adafactor) and its
errors."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megarch.config.presets import tiny_model
from megarch.config.train import TrainConfig
from megarch.eval.loading import load_for_eval
from megarch.model import build_model
from megarch.training.checkpoint import (
    CheckpointError,
    TrainState,
    find_latest,
    list_checkpoints,
    read_lineage,
    read_state,
    rng_state,
    save_checkpoint,
    step_path,
)
from megarch.training.checkpoint_files import (
    read_rng_file,
    save_model_file,
    save_rng_file,
    write_manifest,
)
from megarch.training.optim import build_optimizer
from megarch.training.resume import SavedCheckpoint, load_checkpoint, load_model, saved_layout
from tools.reshard_checkpoint import main as tool_main
from tools.reshard_checkpoint import reshard


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_everything(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # the cached second normals are saved too
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    state = TrainState(step=7, consumed_samples=56, tokens_seen=999, skipped_steps=1)
    path = save_checkpoint(str(tmp_path), state, model, optimizer, '{"x": 1}')
    expected = (random.gauss(0, 1), np.random.standard_normal(), random.random(),
                np.random.rand(), torch.rand(1).item())
    other, other_opt = _model_and_optimizer(1)
    loaded = load_checkpoint(path, other, other_opt)
    assert loaded == state
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    assert (random.gauss(0, 1), np.random.standard_normal(), random.random(), np.random.rand(),
            torch.rand(1).item()) == expected
    assert open(os.path.join(path, "config.json")).read() == '{"x": 1}'


def test_find_latest_ignores_incomplete_writes_and_keeps_last(tmp_path):
    out = str(tmp_path)
    model, optimizer = _model_and_optimizer(0)
    for step in (2, 4, 6):
        save_checkpoint(out, TrainState(step=step), model, optimizer, "{}", keep_last=2)
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    # a killed write: a temporary dir with a newer step, and a step dir without state.json
    os.makedirs(step_path(out, 8) + ".tmp-12345")
    os.makedirs(step_path(out, 10))
    assert find_latest(out) == step_path(out, 6)
    save_checkpoint(out, TrainState(step=7), model, optimizer, "{}", keep_last=0)
    assert not os.path.exists(step_path(out, 8) + ".tmp-12345")  # cleaned by the next save
    assert find_latest(out) == step_path(out, 7)
    assert find_latest(str(tmp_path / "nothing")) is None
    # keep_last prunes only steps older than the one saved: a newer step (another history)
    # and this one stay; pruning renames first, so a kill mid-delete leaves a temporary
    save_checkpoint(out, TrainState(step=12), model, optimizer, "{}")
    save_checkpoint(out, TrainState(step=9), model, optimizer, "{}", keep_last=2)
    assert [s for s, _ in list_checkpoints(out)] == [7, 9, 12]
    os.rename(step_path(out, 7), step_path(out, 7) + ".tmp-delete")  # a kill mid-delete
    assert [s for s, _ in list_checkpoints(out)] == [9, 12]
    save_checkpoint(out, TrainState(step=10), model, optimizer, "{}", keep_last=1)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "step_00000010", "step_00000012"]


def test_rng_streams_of_a_saved_layout(tmp_path):
    """The TP ranks of a stage share one RNG stream: every TP rank reads TP rank 0's file of
    its (stage, DP rank); a stream the checkpoint lacks is stage 0's, flagged to derive."""
    path = str(tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"parallel": {"tp": 2, "pp": 2}}')
    for t in range(2):
        for p in range(2):
            save_model_file({}, os.path.join(path, f"model_tp0{t}_pp0{p}.safetensors"))
    for name, seed in (("rng_tp00_pp00", 1), ("rng_tp01_pp00", 2), ("rng_tp00_pp01", 3),
                       ("rng_tp00_pp01_dp01", 4)):
        torch.manual_seed(seed)
        save_rng_file(rng_state(), os.path.join(path, name + ".safetensors"))
    write_manifest(path)
    saved = SavedCheckpoint(path)

    def seed_of(found: tuple) -> tuple:
        state, own = found
        return next(s for s in range(1, 5) if torch.equal(
            state["torch"], torch.manual_seed(s).get_state())), own

    assert seed_of(saved.rng(0)) == (1, True) and seed_of(saved.rng(1)) == (3, True)
    assert seed_of(saved.rng(1, 1)) == (4, True)
    assert seed_of(saved.rng(0, 1)) == (1, False)  # derive from stage 0's
    assert seed_of(saved.rng(2)) == (1, False)
    assert sorted(saved.rng_streams()) == [(0, 0), (1, 0), (1, 1)]


def _trained_run(out_dir: str, optimizer: str, arch: str = "causal_decoder") -> tuple:
    """A TP1 x PP1 checkpoint of a tiny model after two optimizer steps; (path, model, opt)."""
    cfg = TrainConfig(model=tiny_model(arch))
    cfg.optim.name = optimizer
    cfg.data.tokenizer = "bytes"
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(cfg.optim, model)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        inputs = ({"encoder_tokens": tokens, "decoder_tokens": tokens}
                  if arch == "encoder_decoder" else {"tokens": tokens})
        model(**inputs).float().square().mean().backward()
        opt.step()
    path = save_checkpoint(out_dir, TrainState(step=2, consumed_samples=4), model, opt,
                           cfg.to_json(), lineage={"stages": [], "tokens_by_objective": {}})
    return path, model, opt


def _assert_same_optimizer(saved: dict, expected: dict) -> None:
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert saved["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(saved["state"][index][key], value), (index, key)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_tool_round_trip_through_tp2_pp2_is_bit_exact(tmp_path, optimizer):
    path, model, opt = _trained_run(str(tmp_path / "one"), optimizer)
    sharded = reshard(path, str(tmp_path / "two"), tp=2, pp=2)
    assert saved_layout(sharded) == (2, 2) and read_state(sharded).consumed_samples == 4
    full = model.state_dict()
    # independent reference: torch.chunk of the full tensors along the documented dims
    last = load_file(os.path.join(sharded, "model_tp01_pp01.safetensors"))
    assert torch.equal(last["embed.weight"], full["embed.weight"].chunk(2, 0)[1])  # tied copy
    assert torch.equal(last["blocks.1.attn.o.weight"],
                       full["blocks.1.attn.o.weight"].chunk(2, 1)[1])
    assert "blocks.0.attn.o.weight" not in last
    state = torch.load(os.path.join(sharded, "optimizer_tp01_pp00.pt"))
    index = state["param_names"].index("blocks.0.attn.o.weight")
    moments, ref = state["state"][index], opt.state[model.blocks[0].attn.o.weight]
    if optimizer == "adafactor":  # o is split along dim 1: col_var split, row_var replicated
        assert torch.equal(moments["col_var"], ref["col_var"].chunk(2, 1)[1])
        assert torch.equal(moments["row_var"], ref["row_var"])
    else:
        assert torch.equal(moments["exp_avg"], ref["exp_avg"].chunk(2, 1)[1])
    assert torch.equal(moments["step"], ref["step"])
    saved_rng = read_rng_file(os.path.join(path, "rng.safetensors"))
    for name in ("rng_tp00_pp00", "rng_tp01_pp00"):  # the source's stream, as saved
        rng = read_rng_file(os.path.join(sharded, name + ".safetensors"))
        assert rng.keys() == saved_rng.keys() and torch.equal(rng["torch"], saved_rng["torch"])
        assert rng["python"] == saved_rng["python"]
        assert np.array_equal(rng["numpy"][1], saved_rng["numpy"][1])
    assert "rng_tp00_pp01.safetensors" not in os.listdir(sharded)  # a new stage derives its own
    back = reshard(str(tmp_path / "two"), str(tmp_path / "back"))  # a run dir: its newest
    assert sorted(os.listdir(back)) == sorted(os.listdir(path))
    merged = load_file(os.path.join(back, "model.safetensors"))
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    _assert_same_optimizer(torch.load(os.path.join(back, "optimizer.pt")), opt.state_dict())
    assert read_lineage(back) == read_lineage(path)
    loaded, cfg = load_model(sharded)  # any layout loads as the single-process model
    assert cfg.parallel.tp == cfg.parallel.pp == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
    evaluated, _, _ = load_for_eval(str(tmp_path / "two"))  # megarch-eval: merged in memory
    assert all(torch.equal(evaluated.state_dict()[k], v) for k, v in full.items())


def test_a_missing_shard_file_or_an_indivisible_layout_is_named(tmp_path, capsys):
    path, _, _ = _trained_run(str(tmp_path / "one"), "adamw")
    with pytest.raises(CheckpointError, match=r"--tp 3 \(parallel.tp\) does not divide"):
        reshard(path, str(tmp_path / "three"), tp=3)
    with pytest.raises(CheckpointError, match=r"--pp 3 \(parallel.pp\) does not divide"):
        reshard(path, str(tmp_path / "three"), pp=3)
    assert not os.path.exists(tmp_path / "three" / "checkpoints" / "step_00000002")
    sharded = reshard(path, str(tmp_path / "two"), tp=2, pp=2)
    os.remove(os.path.join(sharded, "model_tp01_pp00.safetensors"))
    with pytest.raises(CheckpointError, match="model_tp01_pp00.safetensors is missing"):
        load_model(sharded)
    assert tool_main([sharded, str(tmp_path / "again")]) == 2
    assert "model_tp01_pp00.safetensors is missing" in capsys.readouterr().err
    os.remove(os.path.join(sharded, "config.json"))  # the record of the shards' layout
    with pytest.raises(CheckpointError, match="config.json cannot be read"):
        load_model(sharded)


def test_tool_round_trip_of_an_encoder_decoder_pipeline(tmp_path):
    path, model, opt = _trained_run(str(tmp_path / "one"), "adafactor", "encoder_decoder")
    sharded = reshard(path, str(tmp_path / "two"), tp=2, pp=2)
    first = load_file(os.path.join(sharded, "model_tp00_pp00.safetensors"))
    second = load_file(os.path.join(sharded, "model_tp00_pp01.safetensors"))
    assert any(k.startswith("encoder_blocks.") for k in first)  # encoder stage, then decoder
    assert not any(k.startswith("encoder_blocks.") for k in second)
    assert any(k.startswith("decoder_blocks.") for k in second)
    back = reshard(sharded, str(tmp_path / "back"))
    merged = load_file(os.path.join(back, "model.safetensors"))
    assert merged.keys() == model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    _assert_same_optimizer(torch.load(os.path.join(back, "optimizer.pt")), opt.state_dict())
