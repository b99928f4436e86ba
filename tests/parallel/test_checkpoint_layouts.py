"""Distributed checkpoints: one step directory per job, resumed at another TP/PP layout.

A run saved at one layout and resumed at another must continue the uninterrupted run's loss
curve (rel. diff <= 1e-5: only the float summation order differs between layouts), with the
same weights and optimizer state; a rank killed inside a save must leave no complete-looking
step. Fast: TP2 and PP2 (2 processes) resumed at TP1 x PP1 and across (TP2 -> PP2), AdamW and
Adafactor, DP2 with dropout resumed (every data-parallel rank continues its own dropout
stream), and the kill. Slow: TP2 x PP2 (4 processes) resumed at TP1 x PP1 and TP1 x PP4.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megarch.parallel.context import ParallelContext
from megarch.parallel.reshard import optimizer_param_names
from megarch.parallel.spawn import SpawnError, spawn
from megarch.training import Trainer, read_metrics
from megarch.training.checkpoint import (
    KILL_IN_SAVE_ENV,
    TrainState,
    checkpoint_dir,
    find_latest,
    save_checkpoint,
    step_path,
)
from megarch.training.checkpoint_files import (
    damage,
)
from tests.training.helpers import fast_config
from tools.reshard_checkpoint import reshard

PRESET = "cd_flm_tiny"
STEPS, SAVED = 4, 2


def _config(embedded, out_dir: str, optimizer: str = "adamw", **extra: str):
    values = {"run__resume": "none", "run__save_every": str(SAVED), "run__keep_last": "0",
              "optim__name": optimizer, **extra}
    return fast_config(PRESET, embedded, out_dir, STEPS, **values)


def _losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir)}


def _assert_continues(resumed: str, straight: str) -> None:
    """The resumed run's losses (steps after SAVED) are the uninterrupted run's."""
    got, expected = _losses(resumed), _losses(straight)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1)), got
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got)
    assert worst <= 1e-5, (got, expected)


def _two_ranks(rank: int, world: int, embedded, root: str) -> None:
    torch.set_num_threads(1)
    Trainer(_config(embedded, os.path.join(root, "tp2"), parallel__tp="2")).train()
    Trainer(_config(embedded, os.path.join(root, "pp2"), "adafactor",
                    parallel__pp="2")).train()
    # the TP2 run's step-2 checkpoint resumed by a PP2 job
    Trainer(_config(embedded, os.path.join(root, "tp2_to_pp2"), parallel__pp="2",
                    run__resume=step_path(os.path.join(root, "tp2"), SAVED))).train()
    # DP2 with dropout: each data-parallel rank resumes its own dropout stream
    dropout = {"model__dropout": "0.1", "parallel__dp": "2"}
    Trainer(_config(embedded, os.path.join(root, "dp2"), **dropout)).train()
    Trainer(_config(embedded, os.path.join(root, "dp2_resumed"), **dropout,
                    run__resume=step_path(os.path.join(root, "dp2"), SAVED))).train()


def test_tp2_and_pp2_checkpoints_resume_at_other_layouts(embedded, tmp_path):
    spawn(2, timeout_s=240)(_two_ranks, embedded, str(tmp_path))
    tp2 = str(tmp_path / "tp2")
    assert sorted(os.listdir(checkpoint_dir(tp2))) == ["step_00000002", "step_00000004"]
    assert {"model_tp00_pp00.safetensors", "optimizer_tp01_pp00.pt",
            "rng_tp01_pp00.safetensors", "state.json", "config.json",
            "manifest.json"} <= set(os.listdir(step_path(tp2, SAVED)))
    _assert_continues(str(tmp_path / "tp2_to_pp2"), tp2)
    assert "rng_tp00_pp00_dp01.safetensors" in os.listdir(
        step_path(str(tmp_path / "dp2"), SAVED))
    _assert_continues(str(tmp_path / "dp2_resumed"), str(tmp_path / "dp2"))
    for name, optimizer in (("tp2", "adamw"), ("pp2", "adafactor")):
        out = str(tmp_path / f"{name}_to_tp1")
        Trainer(_config(embedded, out, optimizer,
                        run__resume=step_path(str(tmp_path / name), SAVED))).train()
        _assert_continues(out, str(tmp_path / name))


def _save_steps(rank: int, world: int, out_dir: str) -> None:
    """A TP2 job saving steps 1 and 2; rank 1 is SIGKILLed inside its step-2 write."""
    ctx = ParallelContext.build(tp=2)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    if rank == 1:  # dies after writing its model shard of step 2, before its optimizer's
        os.environ[KILL_IN_SAVE_ENV] = "2"
    for step in (1, 2):
        save_checkpoint(out_dir, TrainState(step=step), model, optimizer, "{}", ctx=ctx)


def test_a_rank_killed_mid_save_leaves_no_complete_step(tmp_path):
    out_dir = str(tmp_path)
    with pytest.raises(SpawnError):
        spawn(2, timeout_s=60)(_save_steps, out_dir)
    assert find_latest(out_dir) == step_path(out_dir, 1)
    names = sorted(os.listdir(checkpoint_dir(out_dir)))
    assert names == ["step_00000001", "step_00000002.tmp-save"], names
    assert set(os.listdir(step_path(out_dir, 1))) == {
        f"{kind}_tp0{r}_pp00.{ext}" for kind, ext in (
            ("model", "safetensors"), ("optimizer", "pt"), ("rng", "safetensors"))
        for r in (0, 1)
    } | {"config.json", "state.json", "manifest.json"}
    assert damage(step_path(out_dir, 1)) is None  # the manifest lists every file, intact
    partial = os.listdir(step_path(out_dir, 2) + ".tmp-save")
    assert "model_tp01_pp00.safetensors" in partial and "optimizer_tp01_pp00.pt" not in partial
    assert "state.json" not in partial and "manifest.json" not in partial
    # the next save (any process) removes the partial write
    model = torch.nn.Linear(4, 4)
    save_checkpoint(out_dir, TrainState(step=2), model, torch.optim.AdamW(model.parameters()),
                    "{}")
    assert sorted(os.listdir(checkpoint_dir(out_dir))) == ["step_00000001", "step_00000002"]


def _auto_with_one_rank_seeing_damage(rank: int, world: int, out_dir: str) -> tuple:
    """A TP2 job saving steps 1 and 2, then a byte of step 2 flipped in a file only rank 1
    checksums (the ranks share the reads): both ranks must pick step 1, alike."""
    from megarch.training.run_checkpoints import _newest_intact

    ctx = ParallelContext.build(tp=2)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        save_checkpoint(out_dir, TrainState(step=step), model, optimizer, "{}", ctx=ctx)
    path = step_path(out_dir, 2)
    with open(os.path.join(path, "manifest.json")) as f:
        target = sorted(json.load(f)["files"])[1]  # rank 1's share: files 1, 3, ...
    if rank == 0:
        with open(os.path.join(path, target), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    ctx.barrier()
    return target, _newest_intact(out_dir, ctx)


def test_resume_auto_under_tp2_agrees_on_the_previous_checkpoint(tmp_path):
    out_dir = str(tmp_path)
    results = spawn(2, timeout_s=60)(_auto_with_one_rank_seeing_damage, out_dir)
    assert results[0][1] == results[1][1] == step_path(out_dir, 1)
    assert results[0][0].startswith("model_tp00")
    assert sorted(os.listdir(checkpoint_dir(out_dir))) == ["step_00000001",
                                                           "step_00000002.damaged"]


def _tp2_pp2(rank: int, world: int, embedded, root: str, optimizer: str) -> None:
    torch.set_num_threads(1)
    Trainer(_config(embedded, os.path.join(root, "tp2pp2"), optimizer, parallel__tp="2",
                    parallel__pp="2", model__n_layers="4")).train()


def _pp4_state(rank: int, world: int, embedded, root: str, optimizer: str) -> dict:
    """This TP1 x PP4 stage's weights and optimizer state, by name, resumed from TP2 x PP2."""
    torch.set_num_threads(1)
    trainer = Trainer(_config(embedded, os.path.join(root, "pp4"), optimizer,
                              parallel__pp="4", model__n_layers="4",
                              run__resume=step_path(os.path.join(root, "tp2pp2"), STEPS)))
    trainer.resume()
    names = optimizer_param_names(trainer.model, trainer.optimizer)
    state = trainer.optimizer.state_dict()
    return {"step": trainer.state.step,
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": {names[i]: s for i, s in state["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"}
                       for g in state["param_groups"]]}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_tp2_pp2_resumes_at_tp1_pp1_and_tp1_pp4(embedded, tmp_path, optimizer):
    """4 processes: TP2 x PP2 (4 layers) resumed at TP1 x PP1 continues its loss curve; at
    TP1 x PP4 every stage holds exactly the merged checkpoint's weights and optimizer state."""
    root = str(tmp_path)
    spawn(4, timeout_s=300)(_tp2_pp2, embedded, root, optimizer)
    out = os.path.join(root, "tp1")
    Trainer(_config(embedded, out, optimizer, model__n_layers="4",
                    run__resume=step_path(os.path.join(root, "tp2pp2"), SAVED))).train()
    _assert_continues(out, os.path.join(root, "tp2pp2"))
    merged = reshard(os.path.join(root, "tp2pp2"), os.path.join(root, "merged"))
    model = load_file(os.path.join(merged, "model.safetensors"))
    saved = torch.load(os.path.join(merged, "optimizer.pt"))
    by_name = {saved["param_names"][i]: s for i, s in saved["state"].items()}
    stages = spawn(4, timeout_s=300)(_pp4_state, embedded, root, optimizer)
    assert set().union(*(s["model"] for s in stages)) == set(model)
    for pp_rank, stage in enumerate(stages):
        assert {k.split(".")[1] for k in stage["model"] if k.startswith("blocks.")} == {
            str(pp_rank)}
        assert stage["step"] == STEPS
        assert all(torch.equal(v, model[k]) for k, v in stage["model"].items())
        assert stage["groups"] == [{k: v for k, v in g.items() if k != "params"}
                                   for g in saved["param_groups"]]
        for name, state in stage["optimizer"].items():
            assert state.keys() == by_name[name].keys()
            assert all(torch.equal(v, by_name[name][k]) for k, v in state.items()), name
