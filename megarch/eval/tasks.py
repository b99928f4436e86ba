"""Zero-shot multiple-choice tasks: a jsonl format with several prompts per example.

One task is one ``.jsonl`` file (its name is the file name without ``.jsonl``); each non-empty
line is one example, a JSON object with:

- the prompts, either
  - ``"prompts"``: a list of prompt strings, already written out; or
  - ``"template"``: one template string or a list of them, with ``"fields"``: an object of
    values; ``{name}`` in a template is replaced by ``fields[name]`` (Python ``str.format``
    syntax: write ``{{`` and ``}}`` for literal braces);
- ``"choices"``: the answer choices, either a list of strings shared by every prompt or a list
  of lists, one per prompt (a prompt may word its answers differently); with ``"fields"``, the
  choices are templates too;
- ``"label"``: the index of the correct choice (an integer).

Every example of a task has the same number of prompts (prompt ``k`` is the same crowd-sourced
prompt across the task: accuracy is computed per prompt, then the median over prompts, as in
T0-Eval) and every prompt of an example the same number of choices. Examples::

    {"prompts": ["Is the sky blue? Answer:", "Q: sky color blue? A:"], "choices": ["yes", "no"],
     "label": 0}
    {"template": ["{premise} Does it follow that {hypothesis}?", "{premise} => {hypothesis}?"],
     "fields": {"premise": "It rains.", "hypothesis": "the street is wet"},
     "choices": [["yes", "no"], ["true", "false"]], "label": 0}

:func:`load_task` raises :class:`~megarch.data.errors.DataError` naming ``file:line`` and the
field for anything else.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass

from megarch.data.errors import DataError

FORMAT_HINT = (
    'each line: {"prompts": [...]} or {"template": ... , "fields": {...}}, '
    'plus "choices": [...] and "label": <int>'
)


@dataclass
class Example:
    """One multiple-choice example, written out under each of its prompts."""

    prompts: list[str]
    """The example's text under each prompt."""
    choices: list[list[str]]
    """``choices[k]``: the answer choices under prompt ``k`` (same count for every prompt)."""
    label: int
    """Index of the correct choice."""


@dataclass
class Task:
    """A multiple-choice task: a name and its examples, each with ``n_prompts`` prompts."""

    name: str
    """The file name without ``.jsonl``."""
    path: str
    """The file it came from."""
    examples: list[Example]
    """The examples, in file order."""

    @property
    def n_prompts(self) -> int:
        """Prompts per example."""
        return len(self.examples[0].prompts) if self.examples else 0


def _render(template: str, fields: dict, where: str) -> str:
    """``template`` with ``{name}`` replaced by ``fields[name]``; DataError on a bad template."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        for name in names:
            if name not in fields:
                raise DataError(f"{where}: the template uses {{{name}}} but \"fields\" has no "
                                f"{name!r} (it has {sorted(fields)}); add it or fix the template")
        return template.format_map(fields)
    except (ValueError, IndexError, KeyError, AttributeError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{where}: bad template {template!r} ({err}); use {{name}} for a field "
                        "and {{ }} for literal braces") from None


def _string_list(value, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {what} must be a non-empty list of strings; {FORMAT_HINT}")
    return value


def _prompts(record: dict, where: str) -> tuple[list[str], dict | None]:
    """The written-out prompts of a record, and its fields (None without a template)."""
    if ("prompts" in record) == ("template" in record):
        raise DataError(f"{where}: give exactly one of \"prompts\" and \"template\"; "
                        f"{FORMAT_HINT}")
    if "prompts" in record:
        if "fields" in record:
            raise DataError(f"{where}: \"fields\" needs \"template\" (not \"prompts\")")
        return _string_list(record["prompts"], f"{where}: field \"prompts\"", "it"), None
    fields = record.get("fields")
    if not isinstance(fields, dict):
        raise DataError(f"{where}: field \"template\" needs \"fields\": an object of values")
    templates = _string_list(record["template"], f"{where}: field \"template\"", "it")
    return [_render(t, fields, f"{where}: field \"template\"") for t in templates], fields


def _choices(record: dict, n_prompts: int, fields: dict | None, where: str) -> list[list[str]]:
    """``choices[k]`` for every prompt ``k``, rendered with ``fields`` when templated."""
    where = f"{where}: field \"choices\""
    raw = record.get("choices")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: missing or empty; give a list of answer strings (or one "
                        "list per prompt)")
    if all(isinstance(c, list) for c in raw):
        if len(raw) != n_prompts:
            raise DataError(f"{where}: {len(raw)} lists of choices for {n_prompts} prompts; "
                            "give one list per prompt or one shared list")
        per_prompt = [_string_list(c, f"{where}[{k}]", "it") for k, c in enumerate(raw)]
    else:
        per_prompt = [_string_list(raw, where, "it")] * n_prompts
    if len({len(c) for c in per_prompt}) != 1:
        raise DataError(f"{where}: prompts have different numbers of choices "
                        f"{[len(c) for c in per_prompt]}; give each the same count")
    if len(per_prompt[0]) < 2:
        raise DataError(f"{where}: needs at least 2 choices, got {per_prompt[0]}")
    if fields is not None:
        per_prompt = [[_render(c, fields, where) for c in cs] for cs in per_prompt]
    return per_prompt


def parse_example(record: object, where: str) -> Example:
    """One line's JSON value as an :class:`Example`; ``where`` (``file:line``) names it."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object; {FORMAT_HINT}")
    prompts, fields = _prompts(record, where)
    choices = _choices(record, len(prompts), fields, where)
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: field \"label\" must be an integer choice index, got "
                        f"{label!r}")
    if not 0 <= label < len(choices[0]):
        raise DataError(f"{where}: field \"label\"={label} is out of range for "
                        f"{len(choices[0])} choices (0-based)")
    unknown = sorted(set(record) - {"prompts", "template", "fields", "choices", "label", "id"})
    if unknown:
        raise DataError(f"{where}: unknown fields {unknown}; {FORMAT_HINT}")
    return Example(prompts=prompts, choices=choices, label=label)


def load_task(path: str, name: str | None = None) -> Task:
    """Read a task file (module docstring); ``name`` defaults to the file name without
    ``.jsonl``. Raises DataError naming ``file:line`` and the field on bad input."""
    if not os.path.isfile(path):
        raise DataError(f"task file {path} not found; pass a .jsonl file ({FORMAT_HINT})")
    examples: list[Example] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); "
                                "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}); each line must be one "
                                "JSON object") from None
            example = parse_example(record, where)
            if examples and len(example.prompts) != len(examples[0].prompts):
                raise DataError(f"{where}: {len(example.prompts)} prompts, but the task's first "
                                f"example has {len(examples[0].prompts)}; every example needs "
                                "the same prompts")
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples; {FORMAT_HINT}")
    if name is None:
        name = os.path.basename(path)
        name = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return Task(name=name, path=path, examples=examples)
