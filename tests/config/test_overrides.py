"""Dotted overrides parse by field type and name the bad field."""

from dataclasses import dataclass, field

import pytest

from megarch.config.data import DataConfig
from megarch.config.overrides import ConfigError, apply_overrides


@dataclass
class Inner:
    n: int = 1
    rate: float = 0.5
    name: str = "a"
    flag: bool = False
    maybe: int | None = None
    items: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    top: int = 0


def test_types_and_forms():
    cfg = apply_overrides(Outer(), [
        "--inner.n", "7", "--inner.rate=0.25", "--inner.name", "x", "--inner.flag", "yes",
        "--inner.maybe", "3", "--inner.items", "a,b", "--top", "-2",
    ])
    assert cfg == Outer(Inner(7, 0.25, "x", True, 3, ["a", "b"]), -2)
    assert apply_overrides(Outer(), ["--inner.maybe", "none"]).inner.maybe is None


@pytest.mark.parametrize("argv, message", [
    (["--inner.nope", "1"], "has no field 'nope'"),
    (["--inner.n", "x"], "expected int"),
    (["--inner.flag", "maybe"], "expected true or false"),
    (["--top.n", "1"], "is not a section"),
    (["--inner.n"], "needs a value"),
    (["inner.n", "1"], "unexpected argument"),
])
def test_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Outer(), argv)


def test_prefix_for_one_section():
    cfg = apply_overrides(DataConfig(), ["--data.seq_len", "128", "--data.paths", "a,b"], "data")
    assert cfg.seq_len == 128 and cfg.paths == ["a", "b"]
    with pytest.raises(ConfigError, match="--data.<field>"):
        apply_overrides(DataConfig(), ["--seq_len", "1"], "data")


@pytest.mark.parametrize("changes, message", [
    ({"objective": "flm", "layout": "encoder_decoder"}, "full language modeling has no inputs"),
    ({"objective": "xlm"}, "data.objective='xlm'"),
    ({"objective": "plm", "seq_len": 1}, "no room for plm targets"),
    ({"paths": ["a"], "weights": [1.0, 2.0]}, "2 entries for 1 data.paths"),
    ({"noise_density": 1.5}, "noise_density"),
])
def test_data_config_refuses_impossible_settings(changes, message):
    cfg = DataConfig(**changes)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
