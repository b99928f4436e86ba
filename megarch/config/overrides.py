"""Dotted command-line overrides for nested dataclass configs: ``--data.seq_len 128``.

One way everywhere: a config is a dataclass (possibly holding dataclasses), and any field is
set from the command line as ``--<section>.<field> VALUE`` (or ``--<section>.<field>=VALUE``).
Values are parsed by the field's type: int, float, str, bool (true/false/1/0/yes/no), optional
values (``none``), and lists (comma-separated).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config field is unknown, malformed, or conflicts with another; the message says which."""


def _parse_scalar(text: str, kind: Any, name: str) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected true or false, got {text!r}")
    if kind in (int, float, str):
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"--{name}: expected {kind.__name__}, got {text!r}") from None
        if kind is float and value != value:
            raise ConfigError(f"--{name}: NaN is not a value; give a number")
        return value
    raise ConfigError(f"--{name}: fields of type {kind} cannot be set from the command line")


def parse_value(text: str, annotation: Any, name: str) -> Any:
    """Parse ``text`` as a value of the field type ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], name)
    if origin in (list, tuple):
        items = [t for t in text.split(",") if t.strip()]
        return origin(parse_value(t.strip(), args[0], name) for t in items)
    return _parse_scalar(text, annotation, name)


def _field(config: Any, dotted: str) -> tuple[Any, dataclasses.Field]:
    target = config
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            raise ConfigError(
                f"--{dotted}: {where} has no field {part!r}; known: {', '.join(sorted(fields))}"
            )
        if depth == len(parts) - 1:
            return target, fields[part]
        target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"--{dotted}: {'.'.join(parts[: depth + 1])} is not a section")
    raise AssertionError("unreachable")


def apply_overrides(config: Any, argv: list[str], prefix: str = "") -> Any:
    """Apply ``--a.b VALUE`` pairs from ``argv`` to ``config`` in place; return it.

    ``prefix`` lets a command whose config is one section accept ``--data.x`` for field ``x``.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field V")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        dotted = key.replace("-", "_")
        if prefix:
            if not dotted.startswith(prefix + "."):
                raise ConfigError(f"--{key}: this command takes --{prefix}.<field> overrides")
            dotted = dotted[len(prefix) + 1 :]
        owner, field = _field(config, dotted)
        hints = typing.get_type_hints(type(owner))
        setattr(owner, field.name, parse_value(value, hints[field.name], key))
    return config
