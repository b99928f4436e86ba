"""The bad-input sweep: what a user can get wrong, for every command, gives one clear error.

For megarch-data (preprocess, inspect, merge, train-tokenizer, corpus, p3), megarch-train's
configuration, megarch-eval's task files, megarch-study and the tools, each case feeds one
malformed input (bad jsonl lines, missing keys, non-UTF-8 bytes, empty files, outputs that
cannot be written, truncated or corrupt ``.bin``/``.idx``, a missing ``.bin``, wrong types and
impossible values on the command line, labels out of range) and checks: a non-zero exit, no
traceback, a message naming the file or the field, and nothing left behind. The commands run
in process through their ``main(argv)``; a few run as a user runs them, in a subprocess, to see
the real stderr. Damaged checkpoints are swept in tests/training (their own module).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megarch.cli.data import main as data_main
from megarch.eval.cli import main as eval_main
from megarch.study.cli import main as study_main
from megarch.train import main as train_main
from tests.data.p3_writer import prompted, write_task_folder
from tools.bench_crc import main as bench_crc_main
from tools.bench_parallel import main as bench_parallel_main
from tools.estimate_memory import main as estimate_main
from tools.reshard_checkpoint import main as reshard_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = {"prompts": ["Is it?"], "choices": ["yes", "no"], "label": 0}
CACHES = {"index-cache"}
"""What a failed command may leave: the sample-index cache beside a good dataset."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace of good and bad inputs (every path is ``ws / name``)."""
    root = tmp_path_factory.mktemp("bad_inputs")

    def write(name: str, data: str | bytes) -> None:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(root / name, mode) as f:
            f.write(data)

    write("good.jsonl", "".join(json.dumps({"text": f"document {i} has words"}) + "\n"
                                for i in range(60)))
    write("badjson.jsonl", '{"text": "a"}\n{"text": \n')
    write("nokey.jsonl", '{"body": "a"}\n')
    write("nonutf8.jsonl", b'{"text": "caf\xe9"}\n')
    write("empty.jsonl", "")
    write("afile", "a file, not a directory")
    write("bad.json", "{not json")
    write("list.json", "[1, 2]")
    write("task_label.jsonl", json.dumps({**TASK, "label": 5}) + "\n")
    write("task_negative.jsonl", json.dumps({**TASK, "label": -1}) + "\n")
    write("task_type.jsonl", json.dumps({**TASK, "label": "zero"}) + "\n")
    write("task_nonutf8.jsonl", b'{"prompts": ["\xff"], "choices": ["a", "b"], "label": 0}\n')
    write("task_nochoices.jsonl", json.dumps({"prompts": ["x"], "label": 0}) + "\n")
    write("task_empty.jsonl", "")
    write("good_task.jsonl", json.dumps(TASK) + "\n")
    folder = write_task_folder(str(root / "P3corrupt" / "data"), "glue_mrpc_same_thing", "train",
                               [prompted(f"Same? {i}", "yes") for i in range(5)])
    shard = os.path.join(folder, "train.tfrecord-00000-of-00001")
    with open(shard, "r+b") as f:
        raw = bytearray(f.read())
        raw[-8] ^= 1  # a data byte of the last record
        f.seek(0)
        f.write(raw)
    write("task_badjson.jsonl", '{"prompts": ["x"], \n')
    assert data_main(["preprocess", "--input", str(root / "good.jsonl"), "--output",
                      str(root / "ds"), "--tokenizer", "bytes", "--workers", "1", "-q"]) == 0
    good = str(root / "ds_text_document")
    with open(good + ".bin", "rb") as f:
        bin_bytes = f.read()
    with open(good + ".idx", "rb") as f:
        idx_bytes = f.read()
    damaged = {
        "truncbin": (bin_bytes[: len(bin_bytes) // 2], idx_bytes),
        "badmagic": (bin_bytes, b"XXXX" + idx_bytes[4:]),
        "truncidx": (bin_bytes, idx_bytes[:30]),
        "nobin": (None, idx_bytes),
    }
    for name, (bin_data, idx_data) in damaged.items():
        if bin_data is not None:
            write(f"{name}_text_document.bin", bin_data)
        write(f"{name}_text_document.idx", idx_data)
    return root


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
            for f in files + [x for x in dirs if not os.listdir(os.path.join(d, x))]}


def _inspect(ws, name, *more):
    return ["inspect", "--data.paths", str(ws / name), "--data.tokenizer", "bytes",
            "--data.seq_len", "16", "-q", *more]


def _pre(ws, source, *more, output="out", tokenizer="bytes"):
    return ["preprocess", "--input", str(ws / source), "--output", str(ws / output),
            "--tokenizer", tokenizer, "--workers", "1", "-q", *more]


def _train(ws, *more):
    return ["--preset", "cd_flm_tiny", "--data.paths", str(ws / "ds"), "--data.tokenizer",
            "bytes", "--data.seq_len", "16", "--data.split", "1,0,0", "--run.out_dir",
            str(ws / "run"), "--run.steps", "1", "-q", *more]


def _eval(ws, task, *more):
    return ["--checkpoint", str(ws / "norun"), "--tasks", str(ws / task), "-q", *more]


# (id, main, argv(ws), text the one-line error must contain (with ws formatted in))
CASES = [
    ("preprocess-bad-json", data_main, lambda w: _pre(w, "badjson.jsonl"),
     "{ws}/badjson.jsonl:2: not valid JSON"),
    ("preprocess-missing-key", data_main, lambda w: _pre(w, "nokey.jsonl"),
     "{ws}/nokey.jsonl:1: no field 'text'"),
    ("preprocess-non-utf8", data_main, lambda w: _pre(w, "nonutf8.jsonl"),
     "{ws}/nonutf8.jsonl:1: not valid UTF-8"),
    ("preprocess-empty", data_main, lambda w: _pre(w, "empty.jsonl"),
     "{ws}/empty.jsonl: the file is empty"),
    ("preprocess-missing-input", data_main, lambda w: _pre(w, "nothere.jsonl"),
     "{ws}/nothere.jsonl: file not found"),
    ("preprocess-unwritable-output", data_main,
     lambda w: _pre(w, "good.jsonl", output="afile/out"), "{ws}/afile is a file"),
    ("preprocess-workers-0", data_main, lambda w: _pre(w, "good.jsonl", "--workers", "0"),
     "argument --workers: must be >= 1"),
    ("preprocess-workers-type", data_main, lambda w: _pre(w, "good.jsonl", "--workers", "x"),
     "argument --workers: expected an integer"),
    ("preprocess-duplicate-keys", data_main,
     lambda w: _pre(w, "good.jsonl", "--json-keys", "text", "text"), "--json-keys text text"),
    ("preprocess-missing-tokenizer", data_main,
     lambda w: _pre(w, "good.jsonl", tokenizer=str(w / "sp.model")),
     "{ws}/sp.model not found"),
    ("preprocess-not-a-tokenizer", data_main,
     lambda w: _pre(w, "good.jsonl", tokenizer=str(w / "afile")),
     "tokenizer '{ws}/afile'"),
    ("inspect-truncated-bin", data_main, lambda w: _inspect(w, "truncbin"),
     "{ws}/truncbin_text_document.bin"),
    ("inspect-corrupt-idx", data_main, lambda w: _inspect(w, "badmagic"),
     "{ws}/badmagic_text_document.idx: not a Megatron indexed dataset"),
    ("inspect-truncated-idx", data_main, lambda w: _inspect(w, "truncidx"),
     "{ws}/truncidx_text_document.idx: the file is truncated"),
    ("inspect-missing-bin", data_main, lambda w: _inspect(w, "nobin"),
     "{ws}/nobin_text_document.bin: file not found"),
    ("inspect-missing-dataset", data_main, lambda w: _inspect(w, "nothere"),
     "{ws}/nothere: no dataset found"),
    ("inspect-count-0", data_main, lambda w: _inspect(w, "ds", "--count", "0"),
     "argument --count: must be >= 1"),
    ("inspect-start-negative", data_main, lambda w: _inspect(w, "ds", "--start", "-1"),
     "argument --start: must be >= 0"),
    ("inspect-seq-len-type", data_main, lambda w: [*_inspect(w, "ds"), "--data.seq_len", "x"],
     "--data.seq_len: expected int"),
    ("inspect-seq-len-impossible", data_main,
     lambda w: [*_inspect(w, "ds"), "--data.seq_len", "-3"], "data.seq_len=-3"),
    ("inspect-unknown-field", data_main,
     lambda w: [*_inspect(w, "ds"), "--data.seqlen", "8"], "no field 'seqlen'"),
    ("merge-missing-input", data_main,
     lambda w: ["merge", "--input", str(w / "nothere"), "--output", str(w / "m"), "-q"],
     "{ws}/nothere.idx: file not found"),
    ("merge-unwritable-output", data_main,
     lambda w: ["merge", "--input", str(w / "ds_text_document"), "--output",
                str(w / "afile" / "m"), "-q"], "{ws}/afile is a file"),
    ("tokenizer-non-utf8", data_main,
     lambda w: ["train-tokenizer", "--input", str(w / "nonutf8.jsonl"), "--output",
                str(w / "sp"), "-q"], "{ws}/nonutf8.jsonl:1: not valid UTF-8"),
    ("tokenizer-bad-json", data_main,
     lambda w: ["train-tokenizer", "--input", str(w / "badjson.jsonl"), "--output",
                str(w / "sp"), "-q"], "{ws}/badjson.jsonl:2: not valid JSON"),
    ("tokenizer-empty", data_main,
     lambda w: ["train-tokenizer", "--input", str(w / "empty.jsonl"), "--output",
                str(w / "sp"), "-q"], "no text in"),
    ("tokenizer-vocab-0", data_main,
     lambda w: ["train-tokenizer", "--input", str(w / "good.jsonl"), "--output",
                str(w / "sp"), "--vocab-size", "0", "-q"], "argument --vocab-size: must be"),
    ("corpus-unwritable-output", data_main,
     lambda w: ["corpus", "--output", str(w / "afile" / "c.jsonl"), "-q"],
     "{ws}/afile is a file"),
    ("p3-missing-download", data_main,
     lambda w: ["p3", "--p3-dir", str(w / "P3"), "--out", str(w / "p3"), "-q"],
     "--p3-dir {ws}/P3: not a directory"),
    ("p3-corrupt-tfrecord", data_main,
     lambda w: ["p3", "--p3-dir", str(w / "P3corrupt"), "--out", str(w / "p3"), "--eval", "none",
                "--workers", "1", "-q"],
     "{ws}/P3corrupt/data/glue_mrpc_same_thing/train.tfrecord-00000-of-00001: record 4: data "
     "CRC mismatch"),
    ("p3-workers-0", data_main,
     lambda w: ["p3", "--p3-dir", str(w), "--out", str(w / "p3"), "--workers", "0", "-q"],
     "argument --workers: must be >= 1"),
    ("train-config-not-json", train_main,
     lambda w: [*_train(w), "--config", str(w / "bad.json")], "--config {ws}/bad.json"),
    ("train-config-not-object", train_main,
     lambda w: [*_train(w), "--config", str(w / "list.json")], "expected a JSON object"),
    ("train-config-missing", train_main,
     lambda w: [*_train(w), "--config", str(w / "nothere.json")],
     "--config {ws}/nothere.json: No such file"),
    ("train-config-non-utf8", train_main,
     lambda w: [*_train(w), "--config", str(w / "nonutf8.jsonl")], "not valid UTF-8"),
    ("train-wrong-type", train_main, lambda w: [*_train(w), "--model.n_layers", "two"],
     "--model.n_layers: expected int"),
    ("train-impossible-layers", train_main, lambda w: [*_train(w), "--model.n_layers", "-1"],
     "model.n_layers=-1"),
    ("train-negative-steps", train_main, lambda w: [*_train(w), "--run.steps", "-5"],
     "run.steps=-5"),
    ("train-nan-lr", train_main, lambda w: [*_train(w), "--optim.lr", "nan"],
     "--optim.lr: NaN"),
    ("train-unknown-field", train_main, lambda w: [*_train(w), "--model.n_layerz", "2"],
     "no field 'n_layerz'"),
    ("train-unknown-preset", train_main, lambda w: ["--preset", "cd_flx", "-q"],
     "unknown training preset 'cd_flx'"),
    ("train-tp-not-dividing", train_main, lambda w: [*_train(w), "--parallel.tp", "3"],
     "parallel.tp=3"),
    ("train-truncated-data", train_main,
     lambda w: [*_train(w), "--data.paths", str(w / "truncbin")],
     "{ws}/truncbin_text_document.bin"),
    ("train-unwritable-out-dir", train_main,
     lambda w: [*_train(w), "--run.out_dir", str(w / "afile" / "run")], "{ws}/afile is a file"),
    ("train-data-too-short", train_main,
     lambda w: [*_train(w), "--data.seq_len", "4096"], "fewer than one row"),
    ("eval-label-out-of-range", eval_main, lambda w: _eval(w, "task_label.jsonl"),
     '{ws}/task_label.jsonl:1: field "label"=5 is out of range'),
    ("eval-label-negative", eval_main, lambda w: _eval(w, "task_negative.jsonl"),
     '{ws}/task_negative.jsonl:1: field "label"=-1'),
    ("eval-label-wrong-type", eval_main, lambda w: _eval(w, "task_type.jsonl"),
     '{ws}/task_type.jsonl:1: field "label"'),
    ("eval-task-non-utf8", eval_main, lambda w: _eval(w, "task_nonutf8.jsonl"),
     "{ws}/task_nonutf8.jsonl:1: not valid UTF-8"),
    ("eval-task-missing-key", eval_main, lambda w: _eval(w, "task_nochoices.jsonl"),
     '{ws}/task_nochoices.jsonl:1: field "choices"'),
    ("eval-task-empty", eval_main, lambda w: _eval(w, "task_empty.jsonl"),
     "{ws}/task_empty.jsonl: no examples"),
    ("eval-task-bad-json", eval_main, lambda w: _eval(w, "task_badjson.jsonl"),
     "{ws}/task_badjson.jsonl:1: not valid JSON"),
    ("eval-task-missing", eval_main, lambda w: _eval(w, "nothere.jsonl"),
     "task file {ws}/nothere.jsonl not found"),
    ("eval-unwritable-output", eval_main,
     lambda w: [*_eval(w, "good_task.jsonl"), "--output", str(w / "afile" / "r.json")],
     "--output: cannot create directory {ws}/afile"),
    ("eval-batch-size-0", eval_main,
     lambda w: _eval(w, "task_nochoices.jsonl")[:4] + ["--batch-size", "0"], "--batch-size 0"),
    ("study-unknown-pair", study_main, lambda w: ["--pairs", "cd_flx", "--dry-run"],
     "study pairs ['cd_flx']"),
    ("study-negative-steps", study_main,
     lambda w: ["--pairs", "cd_flm", "--steps", "-1", "--dry-run"], "must be >= 1"),
    ("study-wrong-type", study_main,
     lambda w: ["--pairs", "cd_flm", "--steps", "x", "--dry-run"], "argument --steps"),
    ("study-unknown-field", study_main,
     lambda w: ["--pairs", "cd_flm", "--model.n_layerz", "2", "--dry-run"],
     "no field 'n_layerz'"),
    ("study-unwritable-out", study_main,
     lambda w: ["--pairs", "cd_flm", "--steps", "2", "--out", str(w / "afile" / "s"),
                "--data-dir", str(w / "study-data"), "-q"], "{ws}/afile is a file"),
    ("estimate-tp-0", estimate_main, lambda w: ["--preset", "cd_flm", "--tp", "0"],
     "--tp 0: must be >= 1"),
    ("estimate-unknown-preset", estimate_main, lambda w: ["--preset", "nope"],
     "unknown training preset 'nope'"),
    ("estimate-wrong-type", estimate_main, lambda w: ["--dp", "x"], "argument --dp"),
    ("estimate-impossible-layout", estimate_main,
     lambda w: ["--preset", "cd_flm", "--pp", "2", "--sp"], "--sp with pp > 1"),
    ("bench-parallel-steps-0", bench_parallel_main, lambda w: ["--steps", "0"],
     "--steps 0: must be >= 1"),
    ("bench-crc-records-0", bench_crc_main, lambda w: ["--records", "0"],
     "--records, --trials and --python-records must be >= 1"),
    ("reshard-missing-source", reshard_main, lambda w: [str(w / "norun"), str(w / "out")],
     "{ws}/norun is neither a checkpoint"),
    ("reshard-tp-0", reshard_main,
     lambda w: [str(w / "norun"), str(w / "out"), "--tp", "0"], "--tp and --pp must be >= 1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(ws, case, capsys):
    _, main, argv, expected = case
    before = _tree(ws)
    try:
        code = main(argv(ws))
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err
    assert expected.format(ws=ws) in err, err
    assert "error" in err.strip().splitlines()[-1]
    left = {p for p in _tree(ws) - before if p.split(os.sep)[0] not in CACHES}
    assert not left, f"left behind: {sorted(left)}"
    for name in _tree(ws) - before:  # the index cache is rebuilt as needed; start each clean
        top = ws / name.split(os.sep)[0]
        shutil.rmtree(top, ignore_errors=True) if top.is_dir() else top.unlink(missing_ok=True)


SUBPROCESS_CASES = [
    (["tools/preprocess_data.py", "--input", "{ws}/nonutf8.jsonl", "--output", "{ws}/o",
      "--tokenizer", "bytes", "--workers", "2"], "{ws}/nonutf8.jsonl:1: not valid UTF-8"),
    (["tools/merge_datasets.py", "--input", "{ws}/truncbin_text_document", "--output",
      "{ws}/m"], "{ws}/truncbin_text_document.bin"),
    (["-m", "megarch.train", "--preset", "cd_flm_tiny", "--config", "{ws}/bad.json"],
     "--config {ws}/bad.json"),
]


@pytest.mark.parametrize("argv,expected", SUBPROCESS_CASES,
                         ids=["preprocess-workers-2", "merge-truncated", "train-config"])
def test_bad_input_as_a_user_runs_it(ws, argv, expected):
    before = _tree(ws)
    run = subprocess.run([sys.executable, *(a.format(ws=ws) for a in argv)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert expected.format(ws=ws) in run.stderr
    assert _tree(ws) == before
