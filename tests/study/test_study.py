"""megarch-study: the grid, the report files, the speed-up arithmetic, the dry run."""

from __future__ import annotations

import json
import os

import pytest

from megarch.config.overrides import ConfigError
from megarch.study import StudySpec, plan_study, speedup, tokens_to_reach
from megarch.study.cli import main as study_main
from megarch.study.report import adaptation_speedups, format_speedup, markdown, read_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--data.seq_len", "64", "--run.micro_batch", "4", "--run.global_batch", "8"]


def test_speedup_on_hand_built_curves():
    scratch = [(100, 5.0), (200, 4.0), (300, 3.0), (400, 2.5)]
    adapted = [(50, 3.5), (100, 3.0), (150, 2.5)]
    assert tokens_to_reach(scratch, 3.0) == 300
    assert tokens_to_reach(scratch, 3.5) == 250  # halfway between 4.0 at 200 and 3.0 at 300
    assert tokens_to_reach(adapted, 4.0) == 50  # already below at the first point
    assert tokens_to_reach(adapted, 2.0) is None
    measured = speedup(adapted, scratch, target=3.0)
    assert measured == {"target": 3.0, "tokens_adapted": 100.0, "tokens_scratch": 300.0,
                        "speedup": 3.0, "at_start": False}
    assert speedup(adapted, scratch)["speedup"] == 400 / 150  # the baseline's final loss 2.5
    assert speedup(adapted, scratch, target=1.0)["speedup"] is None
    # an adapted curve with its start point (run.eval_at_start) already at the target
    at_start = speedup([(0, 2.9), *adapted], scratch, target=3.0)
    assert at_start["speedup"] is None and at_start["at_start"]
    assert format_speedup(at_start) == "at start"
    assert format_speedup(measured) == "3.00x"
    assert format_speedup(speedup(adapted, scratch, target=1.0)) == "not reached"


def _write_metrics(out_dir, train: list[tuple[int, float]], valid: dict[int, float]) -> str:
    """A metrics.jsonl as the Trainer writes it: 100 tokens per step, a validation record
    after the training record of its step."""
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for step, loss in train:
            f.write(json.dumps({"step": step, "loss": loss, "tokens_seen": 100 * step}) + "\n")
            if step in valid:
                f.write(json.dumps({"step": step, "valid_loss": valid[step],
                                    "valid_ce": valid[step]}) + "\n")
    return str(out_dir)


def _runs(tmp_path, valid_adapted: dict, valid_scratch: dict) -> tuple[list[dict], dict]:
    # training loss says 2x (the adapted run is at 3.0 after 200 tokens, scratch after 400);
    # validation loss says 4x (2.0 after 100 tokens against 400)
    scratch = _write_metrics(tmp_path / "scratch", [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0)],
                             valid_scratch)
    adapted = _write_metrics(tmp_path / "adapted", [(1, 3.5), (2, 3.0), (3, 2.9), (4, 2.8)],
                             valid_adapted)
    runs = [{"name": "scratch", "kind": "pretrain", "out_dir": scratch},
            {"name": "adapted", "kind": "lm-a", "baseline": "scratch", "out_dir": adapted}]
    return runs, {r["name"]: read_curves(r["out_dir"]) for r in runs}


def test_speedup_is_measured_on_validation_loss(tmp_path):
    runs, curves = _runs(tmp_path, {1: 2.0, 4: 1.5}, {2: 3.0, 4: 2.0})
    assert curves["scratch"] == {"train": [(100, 5.0), (200, 4.0), (300, 3.5), (400, 3.0)],
                                 "valid": [(200, 3.0), (400, 2.0)]}
    (measured,) = adaptation_speedups(runs, curves)
    assert measured == {"adapted": "adapted", "baseline": "scratch", "loss": "validation",
                        "target": 2.0, "tokens_adapted": 100.0, "tokens_scratch": 400.0,
                        "speedup": 4.0, "at_start": False}
    table = markdown({"runs": [], "speedups": [measured]})
    assert "| adapted | scratch | validation | 2.0000 | 100 | 400 | 4.00x |" in table


def test_speedup_falls_back_to_training_loss_without_validation(tmp_path, caplog):
    runs, curves = _runs(tmp_path, {}, {2: 3.0, 4: 2.0})
    (measured,) = adaptation_speedups(runs, curves)
    # smoothing window: 4 points // 10 -> 1, so the raw training curves
    assert measured["loss"] == "training" and measured["target"] == 3.0
    assert (measured["tokens_adapted"], measured["tokens_scratch"]) == (200.0, 400.0)
    assert measured["speedup"] == 2.0
    assert "measured on training loss" in caplog.text


def test_tiny_stages_validate_ten_times():
    spec = StudySpec(pairs=["cd_flm", "nd_mlm"], steps=80, adapt=["lm-a"], adapt_steps=40,
                     mtf=True, mtf_steps=20)
    every = {p.name: p.args[p.args.index("--run.eval_every") + 1] for p in plan_study(spec)}
    assert every == {"cd_flm": "8", "nd_mlm": "8", "nd_mlm_lm-a": "4", "cd_flm_mtf": "2",
                     "nd_mlm_mtf": "2", "nd_mlm_lm-a_mtf": "2"}


def _png_ok(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 100


def _run_study(embedded_dir: str, out: str, *extra: str, keep_eval: bool = False) -> dict:
    """The tiny study; validation only at the end of each run unless ``keep_eval``."""
    argv = ["--pairs", "cd_flm,nd_mlm", "--steps", "6", "--out", out,
            "--data-dir", embedded_dir, "-q", *extra, *FAST]
    if not keep_eval:
        argv += ["--run.eval_every", "0"]
    assert study_main(argv) == 0
    with open(os.path.join(out, "report", "results.json"), encoding="utf-8") as f:
        return json.load(f)


def test_tiny_study_writes_the_report(embedded_dir, tmp_path, capsys):
    out = str(tmp_path / "study")
    results = _run_study(embedded_dir, out, "--adapt", "lm-a", "--adapt-steps", "3",
                         keep_eval=True)
    report = os.path.join(out, "report")
    assert [r["name"] for r in results["runs"]] == ["cd_flm", "nd_mlm", "nd_mlm_lm-a"]
    assert [r["steps"] for r in results["runs"]] == [6, 6, 9]
    for row in results["runs"]:
        assert row["valid_loss"] is not None and 0.0 <= row["zero_shot"] <= 1.0
        assert set(row["tasks"]) == {"reverse", "first_word"}
    (measured,) = results["speedups"]
    assert (measured["adapted"], measured["baseline"]) == ("nd_mlm_lm-a", "cd_flm")
    assert measured["loss"] == "validation"
    assert measured["target"] == results["runs"][0]["valid_loss"]  # cd_flm's final one
    # every step of these short runs validates (6 // 10 -> every 1): steps 1..6, and 7..9
    # for the adaptation, at tokens counted from the start of each run, after a first point
    # before each run's first step (run.eval_at_start)
    cd_flm, adapted = (read_curves(r["out_dir"])["valid"] for r in results["runs"][::2])
    assert [t for t, _ in cd_flm] == [512 * s for s in range(0, 7)]
    assert [t for t, _ in adapted] == [512 * s for s in range(0, 4)]
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
