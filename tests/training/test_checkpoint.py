"""Checkpoints: round trip, atomicity (temporary dirs ignored), keep-last, RNG states."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from megarch.training.checkpoint import (
    TrainState,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_path,
)


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
    state = TrainState(step=7, consumed_samples=56, tokens_seen=999, skipped_steps=1)
    path = save_checkpoint(str(tmp_path), state, model, optimizer, '{"x": 1}')
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    other, other_opt = _model_and_optimizer(1)
    loaded = load_checkpoint(path, other, other_opt)
    assert loaded == state
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
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
