"""Shared fixtures: the embedded corpus and tiny pretrained checkpoints, built once."""

from __future__ import annotations

import pytest

from megarch.data.embedded import prepare_embedded
from megarch.training.adapt import StagedTrainer
from tests.training.helpers import fast_config


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> tuple[str, str]:
    """(dataset prefix, tokenizer) of the embedded corpus with a 2,000-id vocabulary."""
    directory = tmp_path_factory.mktemp("embedded")
    return prepare_embedded(str(directory), vocab_size=2000, progress=False)


def pretrain(preset: str, embedded: tuple[str, str], out_dir: str, steps: int = 4) -> str:
    """Train ``preset`` for ``steps`` fast steps; the run's out_dir."""
    StagedTrainer(fast_config(preset, embedded, out_dir, steps)).train()
    return out_dir


@pytest.fixture(scope="session")
def nd_mlm_run(embedded, tmp_path_factory) -> str:
    """A 4-step ND+MLM run (LM-A's starting point)."""
    return pretrain("nd_mlm_tiny", embedded, str(tmp_path_factory.mktemp("nd_mlm")))


@pytest.fixture(scope="session")
def cd_flm_run(embedded, tmp_path_factory) -> str:
    """A 4-step CD+FLM run (NC-A's and MTF's starting point)."""
    return pretrain("cd_flm_tiny", embedded, str(tmp_path_factory.mktemp("cd_flm")))
