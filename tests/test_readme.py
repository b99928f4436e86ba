"""The README is tested: its shell commands run, its Python names import.

Every command of README.md's shell blocks is in :data:`COMMANDS`, with what this test does with
it: ``run`` it (in a scratch directory, on the tiny presets and the embedded corpus, training
cut to 2 steps), run it as a ``dry-run`` (``DRY_RUN=1`` in front: a launch on 8 GPUs),
``covered`` by a named test that runs the same thing on prepared inputs, or ``skip`` with the
reason. A command added to the README without an entry, or an entry whose command left the
README, fails :func:`test_every_readme_command_is_accounted_for`. The console transcript of
launch/README.md (a dry run on a login node) is replayed and compared line for line, and every
dotted ``megarch.`` name either README shows is imported.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
LAUNCH_README = os.path.join(ROOT, "launch", "README.md")
FAST = ["--run.steps", "2", "--run.log_every", "1"]
"""Appended to the training commands that run (later overrides win): two steps, not 50-100."""


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def readme_commands(path: str = README) -> list[str]:
    """The commands of the shell blocks of ``path``: continuation lines joined, comments and
    blank lines dropped, whitespace normalised."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", _text(path), re.S):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def _covered(test: str) -> tuple[str, str]:
    return ("covered", test)


def _skip(reason: str) -> tuple[str, str]:
    return ("skip", reason)


COMMANDS: dict[str, tuple[str, str]] = {
    "pip install -e '.[dev]'": _skip("installs megarch; .ci/run does it in a fresh venv"),
    "megarch-train --preset cd_flm_tiny": ("run", "train"),
    "python -m pytest": _skip("the suite itself"),
    "megarch-data demo --dir data": ("run", "demo"),
    "megarch-data corpus --output data/stdlib.jsonl": ("run", "corpus"),
    "megarch-data train-tokenizer --input data/stdlib.jsonl --output data/stdlib_sp "
    "--vocab-size 8000": ("run", "tokenizer"),
    "megarch-data preprocess --input 'corpus/*.jsonl.gz' --output data/c4 --tokenizer "
    "data/stdlib_sp.model --workers 8": ("run", "preprocess"),
    "megarch-data preprocess --input mtf.jsonl --output data/mtf --json-keys inputs targets "
    "--tokenizer data/stdlib_sp.model": ("run", "preprocess_prompted"),
    "megarch-data merge --input data/c4_part1_text_document data/c4_part2_text_document "
    "--output data/c4_text_document": ("run", "merge"),
    "megarch-data inspect --data.paths data/stdlib --data.tokenizer data/stdlib_sp.model "
    "--data.objective mlm --data.layout decoder --data.seq_len 128 --count 2": ("run", "inspect"),
    "megarch-data inspect ... --json": ("run", "inspect_json"),
    "megarch-train --list-presets": ("run", "presets"),
    "megarch-train --preset ed_mlm_tiny --run.steps 50 --model.n_layers 4": ("run", "train"),
    "megarch-train --preset cd_flm --config cluster.json --data.paths data/c4 "
    "--data.tokenizer spiece.model": _skip("a 4.76B-parameter model on a cluster's data"),
    "GPUS_PER_NODE=8 TP=2 PRESET=cd_flm launch/torchrun_single_node.sh --data.paths data/c4":
        ("dry-run", "8 GPUs"),
    "DRY_RUN=1 NNODES=4 GPUS_PER_NODE=8 MASTER_ADDR=node001 TP=4 PP=2 PRESET=cd_flm "
    "launch/torchrun_multi_node.sh": ("run", "launch"),
    "python tools/estimate_memory.py --preset cd_flm --tp 2 --pp 2 --dp 8": ("run", "estimate"),
    "RECIPE=ed_mlm NNODES=8 MASTER_ADDR=node001 launch/torchrun_multi_node.sh":
        ("dry-run", "8 nodes of 8 GPUs"),
    "python tools/estimate_memory.py --recipes": ("run", "estimate"),
    "python tools/reshard_checkpoint.py runs/cd_flm runs/cd_flm_tp1": _covered(
        "tests/training/test_checkpoint.py::test_tool_round_trip_through_tp2_pp2_is_bit_exact"),
    "python tools/reshard_checkpoint.py runs/cd_flm_tp1 runs/cd_flm_2x2 --tp 2 --pp 2": _covered(
        "tests/training/test_checkpoint.py::test_tool_round_trip_through_tp2_pp2_is_bit_exact"),
    "megarch-train --preset nd_mtf_tiny --run.init_from runs/nd_mlm_tiny --data.paths "
    "mtf_a,mtf_b": _covered("tests/adapt/test_mtf.py::test_mtf_from_a_pretrained_checkpoint"),
    "megarch-train --adapt nc-a --run.init_from runs/cd_flm_tiny --run.steps 200": _covered(
        "tests/adapt/test_adapt.py::test_cli_refusals"),
    "megarch-train --adapt lm-a --run.init_from runs/nd_mlm_tiny --run.steps 200": _covered(
        "tests/adapt/test_adapt.py::test_lm_a_cli_trains_and_records_lineage"),
    "git clone https://huggingface.co/datasets/bigscience/P3": _skip("network, hundreds of GB"),
    "megarch-data p3 --p3-dir P3 --out data/p3 --workers 16": _covered(
        "tests/data/test_p3.py::test_cli_prints_the_summary_and_reports_missing_input"),
    "megarch-data preprocess --input data/p3/mtf/glue_mrpc.jsonl --output "
    "data/p3/tokenized/glue_mrpc --json-keys inputs targets --tokenizer data/t5_sp.model":
        _covered("tests/data/test_p3.py::test_prepare_writes_the_mixture_and_the_eval_tasks"),
    "megarch-train --preset nd_mtf --config data/p3/mtf_data.json --run.init_from runs/nd_mlm":
        _skip("full scale, after a full-scale pretraining"),
    "megarch-eval --checkpoint runs/nd_mtf --tasks 'data/p3/tasks/*.jsonl'": _covered(
        "tests/data/test_p3.py::test_eval_tasks_score_with_rank_classification"),
    "megarch-study --pairs cd_flm,nd_mlm --steps 60 --adapt lm-a --adapt-steps 30 --mtf "
    "--mtf-steps 30 --out study/tiny": _covered(
        "tests/study/test_study.py::test_tiny_study_writes_the_report"),
    "megarch-study --scale full --pairs cd_flm,nd_mlm,ed_mlm --adapt lm-a,nc-a --mtf --steps "
    "131072 --adapt-steps 39936 --mtf-steps 10000 --dry-run": ("run", "study"),
    "megarch-study --pairs cd_flm,nd_mlm --steps 80 --adapt lm-a --adapt-steps 40 --mtf "
    "--mtf-steps 20 --data.seq_len 64 --run.micro_batch 4 --run.global_batch 8 --out "
    "study/tiny": _covered("tests/study/test_study.py::test_tiny_study_with_mtf"),
    "megarch-eval --checkpoint runs/cd_flm_tiny --tasks copa.jsonl rte.jsonl --output "
    "results.json": _covered(
        "tests/eval/test_loading_cli.py::test_cli_writes_the_results_it_prints"),
    "megarch-convert from-hf hf/t5-base-lm-adapt t5_base_lm_adapt": _covered(
        "tests/convert/test_finetune.py::test_mtf_from_a_converted_t5_then_evaluation_and_export"),
    "megarch-train --preset ed_mtf --config t5_base_lm_adapt/model_config.json --run.init_from "
    "t5_base_lm_adapt --data.paths data/p3/tokenized/glue_mrpc": _covered(
        "tests/convert/test_finetune.py::test_mtf_from_a_converted_t5_then_evaluation_and_export"),
    "megarch-convert to-hf runs/ed_mtf t5_base_mtf_hf": _covered(
        "tests/convert/test_to_hf.py::"
        "test_round_trip_gives_every_tensor_back_and_transformers_loads_it"),
    "lm_eval --model megarch --model_args checkpoint=runs/cd_flm_tiny --tasks TASKS": _covered(
        "tests/eval/test_lm_eval_adapter.py::test_lm_eval_command_line_offline"),
}


def _console_scripts() -> dict[str, tuple[str, str]]:
    setup = _text(os.path.join(ROOT, "setup.py"))
    return {name: (module, fn) for name, module, fn in
            re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', setup)}


def _argv(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of a README command, console scripts as this Python."""
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    scripts = _console_scripts()
    if words[0] in scripts:
        module, fn = scripts[words[0]]
        code = f"import sys; from {module} import {fn} as main; sys.exit(main())"
        return env, [sys.executable, "-c", code, *words[1:]]
    if words[0] == "python":
        return env, [sys.executable, *words[1:]]
    if words[0].startswith("launch/"):
        return env, ["bash", os.path.join(ROOT, words[0]), *words[1:]]
    raise AssertionError(f"no way to run {words[0]}")


def _run(command: str, cwd: str, extra: list[str] = (), env: dict | None = None):
    assignments, argv = _argv(shlex.split(command))
    argv = [os.path.join(ROOT, a) if a.startswith("tools/") else a for a in argv] + list(extra)
    environment = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **assignments,
                   **(env or {})}
    run = subprocess.run(argv, cwd=cwd, env=environment, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    return run


def test_every_readme_command_is_accounted_for():
    commands = readme_commands()
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, f"README commands with no entry in tests/test_readme.py: {missing}"
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"entries whose command is no longer in the README: {stale}"


@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how == "covered"])
def test_covering_tests_exist(command):
    path, name = COMMANDS[command][1].split("::")
    assert re.search(rf"^def {name}\(", _text(os.path.join(ROOT, path)), re.M), (path, name)


def _gzip_jsonl(path: str, records: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_data_and_training_commands_run(tmp_path):
    """The data path and the tiny trainings as the README gives them, in order, in one scratch
    directory (the user's inputs, corpus/*.jsonl.gz and mtf.jsonl, made up small)."""
    cwd = str(tmp_path)
    by_key = {key: c for c, (how, key) in COMMANDS.items() if how == "run"}
    run = {}
    for key in ("demo", "corpus", "tokenizer"):
        run[key] = _run(by_key[key], cwd, ["-q"])
    assert os.path.getsize(tmp_path / "data" / "stdlib_text_document.bin") > 500_000  # ~340k uint16
    assert "vocab 8000" in run["tokenizer"].stdout

    os.mkdir(tmp_path / "corpus")
    docs = [{"text": f"Document {i} says something about tokens."} for i in range(40)]
    _gzip_jsonl(str(tmp_path / "corpus" / "a.jsonl.gz"), docs[:20])
    _gzip_jsonl(str(tmp_path / "corpus" / "b.jsonl.gz"), docs[20:])
    with open(tmp_path / "mtf.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"inputs": f"Question {i}?", "targets": f"Answer {i}."}) + "\n"
                     for i in range(10))
    _run(by_key["preprocess"], cwd, ["-q"])
    from megarch.data.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(tmp_path / "data" / "c4_text_document")).num_documents == 40
    _run(by_key["preprocess_prompted"], cwd, ["-q"])
    for key in ("inputs", "targets"):
        assert IndexedDataset(str(tmp_path / "data" / f"mtf_{key}_document")).num_documents == 10
    for part in ("part1", "part2"):  # the parts the merge command names
        _run(by_key["preprocess"].replace("data/c4", f"data/c4_{part}"), cwd, ["-q"])
    _run(by_key["merge"], cwd)
    assert IndexedDataset(str(tmp_path / "data" / "c4_text_document")).num_documents == 80

    out = _run(by_key["inspect"], cwd, ["-q"]).stdout
    assert "<extra_id_0>" in out and "sample 1" in out.lower()
    inspect_json = by_key["inspect_json"].replace("...", by_key["inspect"].split(" ", 2)[2])
    records = [json.loads(line) for line in _run(inspect_json, cwd, ["-q"]).stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1]

    assert "ed_mlm_tiny" in _run(by_key["presets"], cwd).stdout
    for command in (c for c, (how, key) in COMMANDS.items() if key == "train"):
        _run(command, cwd, [*FAST, "-q"])
        preset = shlex.split(command)[2]
        with open(tmp_path / "runs" / preset / "metrics.jsonl", encoding="utf-8") as f:
            steps = [json.loads(line).get("step") for line in f]
        assert steps[-1] == 2, (command, steps)


def test_cheap_tool_and_launch_commands_run(tmp_path):
    for command, (how, key) in COMMANDS.items():
        if how == "dry-run":
            words = shlex.split(_run(command, str(tmp_path), env={"DRY_RUN": "1"}).stdout)
            assert "torch.distributed.run" in words and "--nproc-per-node" in words, command
        elif how == "run" and key in ("launch", "estimate", "study"):
            out = _run(command, str(tmp_path)).stdout
            assert out.strip(), command
    assert os.listdir(tmp_path) == [], "a dry run or an estimate wrote files"


def test_launch_readme_console_transcript_replays(tmp_path):
    """launch/README.md's ```console block (a dry run on a login node): each ``$`` command,
    run where no GPU is visible (and SLURM's scontrol is), prints exactly the lines shown."""
    blocks = re.findall(r"```console\n(.*?)```", _text(LAUNCH_README), re.S)
    assert blocks, "launch/README.md has no console transcript"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # a login node: no GPU
    (bin_dir / "nvidia-smi").chmod(0o755)
    # SLURM's scontrol as on a login node, for the transcript's allocation gpu[001-004]
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu001\\ngpu002\\ngpu003\\n"
                                      "gpu004\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": ROOT}
    env.pop("GPUS_PER_NODE", None)
    for block in blocks:
        steps = re.split(r"^\$ ", re.sub(r"\\\n\s*", "", block), flags=re.M)[1:]
        assert steps
        for step in steps:
            command, *expected = step.rstrip("\n").split("\n")
            command = command.split("  #")[0].strip()
            run = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert (run.stdout + run.stderr).splitlines() == expected, command


def readme_names(path: str = README) -> list[str]:
    return sorted(set(re.findall(r"\bmegarch(?:\.[A-Za-z_]\w*)+", _text(path))))


def _resolve(name: str) -> object:
    """The object a dotted name refers to: the longest importable module, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


@pytest.mark.parametrize("name", readme_names() + readme_names(LAUNCH_README))
def test_readme_python_names_resolve(name):
    """Every dotted megarch name the README shows resolves (file names like
    megarch/eval/tasks.py are paths, not names, and are not matched)."""
    assert _resolve(name) is not None


def test_samples_section_names_resolve():
    from megarch.config.data import DataConfig
    from megarch.data import build_dataset, make_loader
    from megarch.data.datasets import build_dataset as real

    section = _text(README).split("### Samples", 1)[1].split("\n## ", 1)[0]
    assert "megarch.data.build_dataset(DataConfig, tokenizer, split, num_samples)" in section
    assert build_dataset is real and callable(make_loader)
    import inspect

    assert list(inspect.signature(build_dataset).parameters) == [
        "cfg", "tokenizer", "split", "num_samples"]
    assert DataConfig().objective in section
