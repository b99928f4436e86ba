"""Checkpoints: everything needed to continue a run bit for bit, published atomically.

A checkpoint is a directory ``{out_dir}/checkpoints/step_{step:08d}`` holding

- ``model.pt``: the model's state dict;
- ``optimizer.pt``: the optimizer's state dict;
- ``rng.pt``: the Python, NumPy and torch (CPU and CUDA) random states;
- ``state.json``: step, consumed samples (the data position), tokens seen, the schedule's step;
- ``config.json``: the resolved :class:`~megarch.config.train.TrainConfig`;
- ``lineage.json`` (when the run keeps one): the stages that made these weights, e.g.
  pretraining then adaptation (see :mod:`megarch.training.adapt`, :func:`read_lineage`).

It is written into a temporary directory beside it and renamed when complete
(:func:`megarch.atomic.atomic_dir`), so a run killed mid-write leaves only a ``*.tmp-PID``
directory, which :func:`find_latest` ignores and the next save removes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass

import numpy as np
import torch

from megarch.atomic import atomic_dir

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.json"
LINEAGE_FILE = "lineage.json"
"""The checkpoint's lineage: ``{"stages": [...], "tokens_by_objective": {...}}``."""
KILL_IN_SAVE_ENV = "MEGARCH_TEST_KILL_IN_SAVE"
"""Test hook: the step whose save SIGKILLs its own process halfway through the write."""


@dataclass
class TrainState:
    """Where a run is: what a checkpoint records besides tensors."""

    step: int = 0
    """Optimizer steps done (skipped non-finite steps included)."""
    consumed_samples: int = 0
    """Training samples read so far: the data loader restarts here."""
    tokens_seen: int = 0
    """Input tokens processed (both sides for encoder-decoders)."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss or gradient."""


def checkpoint_dir(out_dir: str) -> str:
    """The folder holding the run's checkpoints."""
    return os.path.join(out_dir, "checkpoints")


def step_path(out_dir: str, step: int) -> str:
    """The checkpoint directory of ``step``."""
    return os.path.join(checkpoint_dir(out_dir), f"step_{step:08d}")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first; temporary dirs are ignored."""
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(out_dir: str) -> str | None:
    """The newest complete checkpoint in ``out_dir``, or None."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1][1] if checkpoints else None


def rng_state() -> dict:
    """The Python, NumPy and torch random states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _maybe_die_mid_write(step: int) -> None:
    """The test hook of :data:`KILL_IN_SAVE_ENV`: a real SIGKILL inside the write."""
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
        log.warning("test hook %s=%d: killing this process mid-write", KILL_IN_SAVE_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    out_dir: str,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config_json: str,
    keep_last: int = 0,
    lineage: dict | None = None,
) -> str:
    """Write the checkpoint of ``state.step`` atomically; keep the newest ``keep_last`` (0: all).

    ``lineage`` (JSON-able) is written as ``lineage.json``. Returns the checkpoint's path.
    Saving a step that already has a checkpoint keeps it.
    """
    path = step_path(out_dir, state.step)
    os.makedirs(checkpoint_dir(out_dir), exist_ok=True)
    _remove_stale_temporaries(out_dir)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    with atomic_dir(path) as tmp:
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        _maybe_die_mid_write(state.step)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(config_json)
        if lineage is not None:
            with open(os.path.join(tmp, LINEAGE_FILE), "w", encoding="utf-8") as f:
                json.dump(lineage, f, indent=2)
        # state.json last: its presence marks the directory complete (besides the rename)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=2)
    log.info("saved checkpoint %s", path)
    if keep_last:
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _remove_stale_temporaries(out_dir: str) -> None:
    root = checkpoint_dir(out_dir)
    for name in os.listdir(root):
        if ".tmp-" in name:
            log.info("removing an incomplete checkpoint write %s", name)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_state(path: str) -> TrainState:
    """The :class:`TrainState` of checkpoint ``path``."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return TrainState(**json.load(f))


def read_lineage(path: str) -> dict | None:
    """The ``lineage.json`` of checkpoint ``path``, or None when it has none."""
    file = os.path.join(path, LINEAGE_FILE)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def load_model(path: str, device: torch.device | str = "cpu"):
    """``(model, config)`` of checkpoint ``path``: the model its ``config.json`` describes, with
    its weights, in eval mode (for evaluation and conversion; no optimizer, no RNG)."""
    from megarch.config.train import config_from_json
    from megarch.model import build_model

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = config_from_json(f.read())
    model = build_model(cfg.model, device)
    model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=device))
    return model.eval(), cfg


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> TrainState:
    """Load checkpoint ``path`` into ``model`` (and ``optimizer``, and the RNGs); return its
    :class:`TrainState`."""
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=device))
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(os.path.join(path, "optimizer.pt"), map_location=device)
        )
    if restore_rng:
        set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    state = read_state(path)
    log.info("loaded checkpoint %s (step %d)", path, state.step)
    return state
