"""megarch-study: the grid, the report files, the speed-up arithmetic, the dry run."""

from __future__ import annotations

import json
import os

import pytest

from megarch.config.overrides import ConfigError
from megarch.study import StudySpec, plan_study, speedup, tokens_to_reach
from megarch.study.cli import main as study_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--data.seq_len", "64", "--run.micro_batch", "4", "--run.global_batch", "8",
        "--run.eval_every", "0"]


def test_speedup_on_hand_built_curves():
    scratch = [(100, 5.0), (200, 4.0), (300, 3.0), (400, 2.5)]
    adapted = [(50, 3.5), (100, 3.0), (150, 2.5)]
    assert tokens_to_reach(scratch, 3.0) == 300
    assert tokens_to_reach(scratch, 3.5) == 250  # halfway between 4.0 at 200 and 3.0 at 300
    assert tokens_to_reach(adapted, 4.0) == 50  # already below at the first point
    assert tokens_to_reach(adapted, 2.0) is None
    measured = speedup(adapted, scratch, target=3.0)
    assert measured == {"target": 3.0, "tokens_adapted": 100.0, "tokens_scratch": 300.0,
                        "speedup": 3.0}
    assert speedup(adapted, scratch)["speedup"] == 400 / 150  # the baseline's final loss 2.5
    assert speedup(adapted, scratch, target=1.0)["speedup"] is None


def _png_ok(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 100


def _run_study(embedded_dir: str, out: str, *extra: str) -> dict:
    argv = ["--pairs", "cd_flm,nd_mlm", "--steps", "6", "--out", out,
            "--data-dir", embedded_dir, "-q", *extra, *FAST]
    assert study_main(argv) == 0
    with open(os.path.join(out, "report", "results.json"), encoding="utf-8") as f:
        return json.load(f)


def test_tiny_study_writes_the_report(embedded_dir, tmp_path, capsys):
    out = str(tmp_path / "study")
    results = _run_study(embedded_dir, out, "--adapt", "lm-a", "--adapt-steps", "3")
    report = os.path.join(out, "report")
    assert [r["name"] for r in results["runs"]] == ["cd_flm", "nd_mlm", "nd_mlm_lm-a"]
    assert [r["steps"] for r in results["runs"]] == [6, 6, 9]
    for row in results["runs"]:
        assert row["valid_loss"] is not None and 0.0 <= row["zero_shot"] <= 1.0
        assert set(row["tasks"]) == {"reverse", "first_word"}
    (measured,) = results["speedups"]
    assert (measured["adapted"], measured["baseline"]) == ("nd_mlm_lm-a", "cd_flm")
    with open(os.path.join(report, "results.md"), encoding="utf-8") as f:
        table = [line for line in f if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == [
        "run", "cd_flm", "nd_mlm", "nd_mlm_lm-a", "adapted", "nd_mlm_lm-a"]
    for name in ("loss_curves.png", "accuracy.png", "adaptation.png"):
        assert _png_ok(os.path.join(report, name)), name
    assert "study done" in capsys.readouterr().out


def test_tiny_study_with_mtf(embedded_dir, tmp_path):
    results = _run_study(embedded_dir, str(tmp_path / "study"), "--mtf", "--mtf-steps", "4")
    assert [(r["name"], r["kind"]) for r in results["runs"]] == [
        ("cd_flm", "pretrain"), ("nd_mlm", "pretrain"), ("cd_flm_mtf", "mtf"),
        ("nd_mlm_mtf", "mtf")]
    assert results["runs"][2]["objective"] == "multitask" and not results["speedups"]


def test_dry_run_prints_the_full_scale_commands(capsys):
    argv = ["--scale", "full", "--pairs", "cd_flm,nd_mlm,ed_mlm", "--adapt", "lm-a,nc-a",
            "--mtf", "--steps", "131072", "--adapt-steps", "39936", "--out", "s", "--dry-run"]
    assert study_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("megarch-train --preset cd_flm --run.steps 131072 "
                        "--run.out_dir s/runs/cd_flm")
    assert ("megarch-train --adapt nc-a --run.init_from s/runs/cd_flm --run.steps 171008 "
            "--run.out_dir s/runs/cd_flm_nc-a") in lines
    assert sum(line.startswith("megarch-train --preset ed_mtf ") for line in lines) == 1
    assert sum(line.startswith("megarch-eval ") for line in lines) == 10


@pytest.mark.parametrize("spec,reason", [
    (StudySpec(pairs=["cd_flm"], adapt=["lm-a"]), "lm-a adapts nd_mlm"),
    (StudySpec(pairs=["xx_flm"]), "use some of"),
    (StudySpec(scale="huge"), "scale"),
])
def test_bad_specs_are_refused(spec, reason):
    with pytest.raises(ConfigError, match=reason):
        plan_study(spec)
