"""ParallelConfig: which sizes are accepted for which launched world size."""

from __future__ import annotations

import pytest

from megarch.config.overrides import ConfigError
from megarch.config.train import ParallelConfig


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = ParallelConfig()
    cfg.validate()
    assert cfg.data_parallel_size() == 1


def test_tp_and_dp_accepted_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = ParallelConfig(tp=2)
    cfg.validate()
    assert cfg.data_parallel_size() == 2
    ParallelConfig(tp=2, dp=2, zero1=True).validate()
    ParallelConfig(tp=2, pp=2).validate()


@pytest.mark.parametrize(("world", "fields", "needle"), [
    ("1", {"tp": 2}, "parallel.tp=2"),
    ("4", {"tp": 3}, "parallel.tp=3"),
    ("4", {"tp": 2, "dp": 3}, "parallel.dp=3"),
    ("1", {"pp": 2}, "parallel.pp=2"),
    ("2", {"tp": 0}, "parallel.tp=0"),
])
def test_refusals_name_the_field(monkeypatch, world, fields, needle):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=needle):
        ParallelConfig(**fields).validate()
