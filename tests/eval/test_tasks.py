"""The jsonl task format: prompts, templates, per-prompt choices, and errors naming file:line."""

from __future__ import annotations

import json

import pytest

from megarch.data.errors import DataError
from megarch.eval.tasks import load_task


def _write(tmp_path, lines, name="task.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n", encoding="utf-8")
    return str(path)


def test_prompts_templates_and_per_prompt_choices(tmp_path):
    path = _write(tmp_path, [
        {"prompts": ["p1", "p2"], "choices": ["yes", "no"], "label": 1},
        "",
        {"template": ["{a} then {b}?", "{{literal}} {a}"], "fields": {"a": "x", "b": 2},
         "choices": [["{b} yes", "no"], ["true", "false"]], "label": 0, "id": "ex-7"},
    ], name="rte.jsonl")
    task = load_task(path)
    assert task.name == "rte" and task.n_prompts == 2 and len(task.examples) == 2
    first, second = task.examples
    assert first.prompts == ["p1", "p2"] and first.choices == [["yes", "no"]] * 2
    assert first.label == 1
    assert second.prompts == ["x then 2?", "{literal} x"]
    assert second.choices == [["2 yes", "no"], ["true", "false"]]
    assert load_task(path, name="other").name == "other"


@pytest.mark.parametrize("line,message", [
    ("{not json", r":1: not valid JSON"),
    ("[1, 2]", r":1: expected a JSON object"),
    ({"choices": ["a", "b"], "label": 0}, r":1: give exactly one of \"prompts\" and \"template\""),
    ({"prompts": ["p"], "template": "t", "choices": ["a", "b"], "label": 0}, "exactly one"),
    ({"prompts": [], "choices": ["a", "b"], "label": 0}, r"field \"prompts\""),
    ({"prompts": ["p"], "fields": {}, "choices": ["a", "b"], "label": 0}, r"\"fields\" needs"),
    ({"template": "{x}", "choices": ["a", "b"], "label": 0}, r"needs \"fields\""),
    ({"template": "{x}", "fields": {"y": 1}, "choices": ["a", "b"], "label": 0},
     r"field \"template\": the template uses \{x\}"),
    ({"template": "{x", "fields": {"x": 1}, "choices": ["a", "b"], "label": 0}, "bad template"),
    ({"prompts": ["p"], "label": 0}, r"field \"choices\": missing"),
    ({"prompts": ["p"], "choices": ["a"], "label": 0}, "at least 2 choices"),
    ({"prompts": ["p", "q"], "choices": [["a", "b"]], "label": 0}, "1 lists of choices for 2"),
    ({"prompts": ["p", "q"], "choices": [["a", "b"], ["a", "b", "c"]], "label": 0},
     "different numbers of choices"),
    ({"prompts": ["p"], "choices": ["a", 3], "label": 0}, r"field \"choices\""),
    ({"prompts": ["p"], "choices": ["a", "b"], "label": 2}, r"field \"label\"=2 is out of range"),
    ({"prompts": ["p"], "choices": ["a", "b"], "label": "0"}, r"field \"label\" must be"),
    ({"prompts": ["p"], "choices": ["a", "b"]}, r"field \"label\""),
    ({"prompts": ["p"], "choices": ["a", "b"], "label": 0, "lable": 1}, r"unknown fields"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, [line])
    with pytest.raises(DataError, match=message) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}:1: ")


def test_file_level_errors(tmp_path):
    ok = {"prompts": ["p", "q"], "choices": ["a", "b"], "label": 0}
    path = _write(tmp_path, [ok, ok, {"prompts": ["p"], "choices": ["a", "b"], "label": 0}])
    with pytest.raises(DataError, match=r":3: 1 prompts, but the task's first example has 2"):
        load_task(path)
    with pytest.raises(DataError, match="no examples"):
        load_task(_write(tmp_path, [""], name="empty.jsonl"))
    with pytest.raises(DataError, match="not found"):
        load_task(str(tmp_path / "missing.jsonl"))
