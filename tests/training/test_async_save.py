"""Asynchronous checkpoints (run.async_save true): training goes on while the files are written,
the files are those of a synchronous save, a stop waits for the save in flight, and a kill
inside a background write leaves the previous checkpoint the newest, resumed exactly."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
from safetensors.torch import load_file

import megarch.training.checkpoint as checkpoint
from megarch.training import Trainer
from megarch.training.checkpoint import find_latest, list_checkpoints, read_state, step_path
from tests.training.helpers import fast_config

DELAY = 0.6
"""Seconds each model file takes to write here (a slow filesystem)."""


def _slow_writes(monkeypatch) -> list[tuple[str, float, float]]:
    """Make every model-file write take DELAY s; the (thread, start, end) of each."""
    windows: list[tuple[str, float, float]] = []
    real = checkpoint.save_model_file

    def slow(state, path):
        start = time.monotonic()
        time.sleep(DELAY)
        real(state, path)
        windows.append((threading.current_thread().name, start, time.monotonic()))

    monkeypatch.setattr(checkpoint, "save_model_file", slow)
    return windows


def _step_ends(trainer: Trainer) -> list[float]:
    ends: list[float] = []
    step = trainer.train_step

    def timed(*args, **kwargs):
        record = step(*args, **kwargs)
        ends.append(time.monotonic())
        return record

    trainer.train_step = timed
    return ends


def _model_files(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def test_training_goes_on_while_the_checkpoint_is_written(embedded, tmp_path, monkeypatch):
    windows = _slow_writes(monkeypatch)
    cfg = fast_config("cd_flm_tiny", embedded, str(tmp_path / "async"), 4, run__save_every="2",
                      run__keep_last="0", run__async_save="true")
    trainer = Trainer(cfg)
    ends = _step_ends(trainer)
    result = trainer.train()
    # the step-2 save was written by a background thread while step 3 trained
    name, start, end = windows[0]
    assert name.startswith("megarch-save") and start < ends[2] < end
    # the run's end waited for the last save: both are complete when train() returns
    assert [s for s, _ in list_checkpoints(cfg.run.out_dir)] == [2, 4]
    assert result.checkpoint == find_latest(cfg.run.out_dir) == step_path(cfg.run.out_dir, 4)
    sync = fast_config("cd_flm_tiny", embedded, str(tmp_path / "sync"), 4, run__save_every="2",
                       run__keep_last="0", run__async_save="false")
    Trainer(sync).train()
    for step in (2, 4):  # the same bytes of weights and state as a synchronous save
        a, b = (_model_files(step_path(c.run.out_dir, step)) for c in (cfg, sync))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert read_state(step_path(cfg.run.out_dir, step)) == read_state(
            step_path(sync.run.out_dir, step))
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(cfg.run.out_dir,
                                                                 "checkpoints")))


def test_a_stop_signal_waits_for_the_save_in_flight(embedded, tmp_path, monkeypatch):
    """SIGTERM while the step-2 checkpoint is being written: the run saves its stop step and
    returns only once both are published."""
    windows = _slow_writes(monkeypatch)
    real = checkpoint.save_model_file

    def signalling(state, path):
        if not windows:  # the first (step 2) write: the scheduler's signal arrives meanwhile
            os.kill(os.getpid(), signal.SIGTERM)
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_model_file", signalling)
    cfg = fast_config("cd_flm_tiny", embedded, str(tmp_path), 50, run__save_every="2",
                      run__keep_last="0", run__async_save="true")
    result = Trainer(cfg).train()
    assert result.stopped_by_signal
    steps = [s for s, _ in list_checkpoints(cfg.run.out_dir)]
    assert steps[0] == 2 and steps[-1] == result.state.step < 50
    assert find_latest(cfg.run.out_dir) == result.checkpoint


def test_a_kill_inside_a_background_write_leaves_the_previous_checkpoint(embedded, tmp_path):
    """SIGKILL inside the background write of step 4: step 2 stays the newest, and resuming
    from it gives the uninterrupted run's losses."""
    from megarch.train import main
    from megarch.training import read_metrics
    from megarch.training.checkpoint import KILL_IN_SAVE_ENV
    from tests.training.helpers import fast_args, start_training

    def args(out_dir: str) -> list[str]:
        return fast_args(embedded, out_dir, 6, run__save_every="2", run__keep_last="0",
                         run__async_save="true", run__log_every="1")

    straight = str(tmp_path / "straight")
    assert main(["--preset", "cd_flm_tiny", "-q", *args(straight)]) == 0
    out_dir = str(tmp_path / "killed")
    process = start_training("cd_flm_tiny", args(out_dir), env={KILL_IN_SAVE_ENV: "4"})
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert find_latest(out_dir) == step_path(out_dir, 2)
    assert main(["--preset", "cd_flm_tiny", "-q", *args(out_dir)]) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(out_dir)}
    reference = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert all(resumed[s] == reference[s] for s in (3, 4, 5, 6))


def test_the_checkpoint_benchmark_prints_both_stalls(capsys):
    from tools.bench_checkpoint import main

    assert main(["--trials", "1", "--model.n_layers", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| synchronous") or line.startswith("| asynchronous")}
    assert set(rows) == {"synchronous", "asynchronous"} and min(rows.values()) > 0
    assert float(out.rsplit("async / sync stall:", 1)[1]) > 0


def _tp2_run(rank: int, world: int, embedded, root: str) -> list[int]:
    torch.set_num_threads(1)
    steps = []
    for kind in ("true", "false"):
        cfg = fast_config("cd_flm_tiny", embedded, os.path.join(root, kind), 3,
                          run__save_every="1", run__keep_last="0", run__async_save=kind,
                          parallel__tp="2")
        Trainer(cfg).train()
        steps.append([s for s, _ in list_checkpoints(cfg.run.out_dir)])
    return steps


def test_a_tp2_job_publishes_each_background_save_once_every_rank_wrote(embedded, tmp_path):
    """Two gloo ranks: the main rank publishes a step only when both ranks' files are there;
    the checkpoints equal the synchronous job's file for file."""
    from megarch.parallel.spawn import spawn

    results = spawn(2, timeout_s=180)(_tp2_run, embedded, str(tmp_path))
    assert results[0] == [[1, 2, 3], [1, 2, 3]]
    for step in (1, 2, 3):
        a, b = (step_path(str(tmp_path / kind), step) for kind in ("true", "false"))
        files = sorted(n for n in os.listdir(a))
        assert files == sorted(os.listdir(b)) and "model_tp01_pp00.safetensors" in files
        for shard in ("model_tp00_pp00.safetensors", "model_tp01_pp00.safetensors"):
            x, y = load_file(os.path.join(a, shard)), load_file(os.path.join(b, shard))
            assert all(torch.equal(x[k], y[k]) for k in x)
