"""Small training configs on the embedded corpus, as objects and as command lines."""

from __future__ import annotations

import os
import subprocess
import sys

from megarch.config.train import TrainConfig, get_train_preset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Small enough for a few seconds per run on a shared CPU, big enough to learn something.
FAST = {
    "data.seq_len": "64",
    "run.micro_batch": "4",
    "run.global_batch": "8",
    "run.eval_batches": "0",
    "run.log_every": "1000",
    "optim.warmup_steps": "2",
}


def fast_args(embedded: tuple[str, str], out_dir: str, steps: int, **extra: str) -> list[str]:
    """Dotted overrides for a fast tiny run (``extra`` keys use ``__`` for ``.``)."""
    prefix, tokenizer = embedded
    values = {**FAST, "data.paths": prefix, "data.tokenizer": tokenizer,
              "run.out_dir": out_dir, "run.steps": str(steps)}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    args: list[str] = []
    for key, value in values.items():
        args += [f"--{key}", value]
    return args


def fast_config(preset: str, embedded: tuple[str, str], out_dir: str, steps: int,
                **extra: str) -> TrainConfig:
    """The :class:`TrainConfig` of :func:`fast_args` on ``preset``."""
    from megarch.config.overrides import apply_overrides

    cfg = get_train_preset(preset)
    return apply_overrides(cfg, fast_args(embedded, out_dir, steps, **extra))


def start_training(preset: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """``python -m megarch.train --preset PRESET -q ARGS`` as a real subprocess leading its
    own process group."""
    environment = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "megarch.train", "--preset", preset, "-q", *args],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a scheduler's job step
    )
