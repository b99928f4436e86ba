"""Resume is exact after SIGKILL, a kill inside a checkpoint write is harmless, SIGTERM saves.

Each case starts ``python -m megarch.train`` as a real process, stops it the hard way and
compares the per-step losses (``metrics.jsonl``) and final weights, bit for bit, against one
uninterrupted run of the same config.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from megarch.train import main
from megarch.training import read_metrics
from megarch.training.checkpoint import (
    KILL_IN_SAVE_ENV,
    checkpoint_dir,
    find_latest,
    read_state,
    step_path,
)
from tests.training.helpers import fast_args, start_training

PRESET = "nd_mlm_tiny"
STEPS, EVERY = 16, 4
# dropout exercises the restored torch RNG; keep every checkpoint to compare
EXTRA = {"model__dropout": "0.1", "run__save_every": str(EVERY), "run__keep_last": "0"}


def _args(embedded, out_dir: str) -> list[str]:
    return ["--preset", PRESET, "-q", *fast_args(embedded, out_dir, STEPS, **EXTRA)]


def _wait_for(predicate, process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            output = process.stdout.read()
            pytest.fail(f"training exited ({process.returncode}) too early:\n{output}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.01)


def _final_weights(out_dir: str) -> dict:
    return load_file(os.path.join(step_path(out_dir, STEPS), "model.safetensors"))


@pytest.fixture(scope="module")
def straight(embedded, tmp_path_factory) -> tuple[list[float], dict]:
    """Losses and final weights of the uninterrupted run."""
    out_dir = str(tmp_path_factory.mktemp("straight"))
    assert main(_args(embedded, out_dir)) == 0
    losses = [r["loss"] for r in read_metrics(out_dir)]
    assert len(losses) == STEPS
    return losses, _final_weights(out_dir)


def _assert_same_run(out_dir: str, straight) -> None:
    losses, weights = straight
    assert [r["loss"] for r in read_metrics(out_dir)] == losses  # bit for bit
    resumed = _final_weights(out_dir)
    for name, value in weights.items():
        assert torch.equal(resumed[name], value), name


def test_resume_after_sigkill_is_exact(embedded, tmp_path, straight):
    out_dir = str(tmp_path)
    process = start_training(PRESET, _args(embedded, out_dir)[3:])
    _wait_for(lambda: find_latest(out_dir) is not None, process)
    assert process.poll() is None, "the run finished before it could be killed"
    process.kill()  # SIGKILL: no handler, no clean-up
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = read_state(find_latest(out_dir)).step
    assert killed_at < STEPS
    assert main(_args(embedded, out_dir)) == 0  # --run.resume auto is the default
    _assert_same_run(out_dir, straight)


def test_kill_inside_a_checkpoint_write_resumes_from_the_previous_one(embedded, tmp_path,
                                                                      straight):
    out_dir = str(tmp_path)
    process = start_training(PRESET, _args(embedded, out_dir)[3:],
                             env={KILL_IN_SAVE_ENV: str(2 * EVERY)})
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(checkpoint_dir(out_dir)) if ".tmp-" in n]
    assert leftovers and leftovers[0].startswith(f"step_{2 * EVERY:08d}")
    assert find_latest(out_dir) == step_path(out_dir, EVERY)
    assert main(_args(embedded, out_dir)) == 0
    _assert_same_run(out_dir, straight)


def test_sigterm_saves_and_exits_zero(embedded, tmp_path):
    out_dir = str(tmp_path)
    # with a data-loader worker, signalled as a scheduler does: the whole process group
    args = fast_args(embedded, out_dir, 100000, data__num_workers="1")
    process = start_training("cd_flm_tiny", args)
    metrics = os.path.join(out_dir, "metrics.jsonl")

    def two_steps_done() -> bool:
        return os.path.exists(metrics) and open(metrics).read().count("\n") >= 2

    _wait_for(two_steps_done, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "stopped by signal" in output
    last_step = read_metrics(out_dir)[-1]["step"]
    latest = find_latest(out_dir)
    assert latest == step_path(out_dir, last_step) and 2 <= last_step < 100000
    assert read_state(latest).consumed_samples == last_step * 8
