"""Checkpoints that can neither run code nor be silently damaged.

- A pickle whose ``__reduce__`` would run a shell command, put in place of EACH file a
  checkpoint holds (the manifest re-made to list it, as an attacker would), is refused by every
  loader (resume, ``load_checkpoint``, megarch-eval's loader, the reshard tool) and the command
  never runs; the same payload does run under a full unpickler (the test's payload is live).
- An older checkpoint (pickled ``model.pt`` / ``rng.pt``, no manifest) is refused with the
  migration command; ``tools/migrate_checkpoint.py`` converts it exactly, and refuses a
  malicious one without running it.
- The manifest's checksums match independent references (CRC32C and zlib CRC32 check values);
  a flipped byte, a truncated file, a ``state.json`` of wrong types each give one clear line
  from the real ``megarch-train`` (exit 2, no traceback) naming the file; with
  ``run.resume=auto`` a damaged newest checkpoint is reported and the previous one used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import megarch.training.checkpoint_files as checkpoint_files
from megarch.eval.loading import EvalError, load_for_eval
from megarch.model import build_model
from megarch.train import main
from megarch.training.adapt import StagedTrainer
from megarch.training.checkpoint import (
    CheckpointError,
    find_latest,
    list_checkpoints,
    read_state,
    rng_state,
    step_path,
)
from megarch.training.checkpoint_files import (
    bytes_checksum,
    damage,
    read_rng_file,
    write_manifest,
)
from megarch.training.optim import build_optimizer
from megarch.training.resume import SavedCheckpoint, load_checkpoint, load_model
from tests.training.helpers import REPO, fast_args, fast_config
from tools.migrate_checkpoint import main as migrate_main
from tools.reshard_checkpoint import reshard

PRESET = "cd_flm_tiny"
STEPS, EVERY = 4, 2
FILES = ["config.json", "lineage.json", "manifest.json", "model.safetensors", "optimizer.pt",
         "rng.safetensors", "state.json"]
"""Every file of a TP1 x PP1 checkpoint (the test refuses to pass if one is added unseen)."""
NOT_READ_BY_EVAL = {"optimizer.pt", "rng.safetensors"}
"""Files evaluation never opens (their sizes are still checked)."""


class _Payload:
    """Unpickled by a full unpickler, this runs ``touch MARKER``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_payload(file: str, marker: str) -> None:
    torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, file)


@pytest.fixture(scope="module")
def run_dir(embedded, tmp_path_factory) -> str:
    """A finished tiny run with checkpoints at steps 2 and 4."""
    out_dir = str(tmp_path_factory.mktemp("run"))
    args = fast_args(embedded, out_dir, STEPS, run__save_every=str(EVERY), run__keep_last="0")
    assert main(["--preset", PRESET, "-q", *args]) == 0
    assert [s for s, _ in list_checkpoints(out_dir)] == [2, 4]
    return out_dir


def _copy(run_dir: str, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(run_dir, out)
    return out


def _cli(embedded, out_dir: str, *extra: str) -> subprocess.CompletedProcess:
    """``python -m megarch.train`` on the run (``extra``: more options)."""
    args = fast_args(embedded, out_dir, STEPS, run__save_every=str(EVERY), run__keep_last="0")
    return subprocess.run(
        [sys.executable, "-m", "megarch.train", "--preset", PRESET, "-q", *args, *extra],
        env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=240)


def _assert_one_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("megarch-train:")]
    assert len(errors) == 1, out.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _resume(embedded, out_dir: str, path: str) -> None:
    cfg = fast_config(PRESET, embedded, out_dir, STEPS, run__resume=path)
    StagedTrainer(cfg).resume()


def _model_of(run_dir: str) -> tuple:
    """A model and optimizer of the run's config."""
    cfg = SavedCheckpoint(step_path(run_dir, 4)).config()
    model = build_model(cfg.model)
    return model, build_optimizer(cfg.optim, model)


def test_checksums_match_independent_references(tmp_path, monkeypatch):
    data = b"123456789"  # the check value of each CRC's specification
    assert bytes_checksum(data, "crc32c") == "e3069283"
    assert bytes_checksum(data, "crc32") == f"{zlib.crc32(data):08x}" == "cbf43926"
    assert bytes_checksum([b"1234", b"56789"], "crc32c") == "e3069283"  # chunked
    (tmp_path / "a.bin").write_bytes(data)
    write_manifest(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checksum"] == "crc32c"
    assert manifest["files"] == {"a.bin": {"size": 9, "checksum": "e3069283"}}
    monkeypatch.setattr(checkpoint_files, "google_crc32c", None)  # the wheel missing: zlib's CRC32
    write_manifest(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checksum"] == "crc32"
    assert manifest["files"]["a.bin"]["checksum"] == "cbf43926"


def test_a_flipped_byte_is_found_by_the_rank_that_checks_that_file(run_dir, tmp_path):
    path = step_path(_copy(run_dir, tmp_path), 4)
    assert damage(path) is None
    file = os.path.join(path, "optimizer.pt")
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum sees it
    open(file, "wb").write(bytes(data))
    assert "optimizer.pt has crc32c" in damage(path) and "(corrupted)" in damage(path)
    mine = sorted(set(FILES) - {"manifest.json"}).index("optimizer.pt") % 2
    assert "optimizer.pt" in damage(path, mine, 2)  # two ranks share the reads
    assert damage(path, 1 - mine, 2) is None
    with pytest.raises(CheckpointError, match="optimizer.pt has crc32c"):
        load_checkpoint(path, *_model_of(run_dir))


def test_the_payload_is_live_under_a_full_unpickler(tmp_path):
    marker = tmp_path / "ran"
    _write_payload(str(tmp_path / "evil.pt"), str(marker))
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", FILES)
def test_a_malicious_pickle_in_any_file_is_refused_without_running(embedded, run_dir, tmp_path,
                                                                    name):
    out = _copy(run_dir, tmp_path)
    path = step_path(out, 4)
    assert sorted(os.listdir(path)) == FILES
    model, optimizer = _model_of(run_dir)
    load_checkpoint(path, model, optimizer)  # intact: loads
    marker = tmp_path / "ran"
    _write_payload(os.path.join(path, name), str(marker))
    if name != "manifest.json":
        write_manifest(path)  # the manifest made to vouch for it
    with pytest.raises(CheckpointError):
        _resume(embedded, str(tmp_path / "elsewhere"), path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model, optimizer)
    if name in NOT_READ_BY_EVAL:
        load_for_eval(path, tokenizer="bytes")  # never opened
    else:
        with pytest.raises(EvalError):
            load_for_eval(path, tokenizer="bytes")
    with pytest.raises(CheckpointError):
        reshard(path, str(tmp_path / "resharded"), tp=2)
    assert not marker.exists()


def _make_legacy(path: str) -> None:
    """Turn ``path`` (any layout) into a checkpoint of the older format: pickled model and RNG
    files, no manifest."""
    for name in sorted(os.listdir(path)):
        file, stem = os.path.join(path, name), name[: -len(".safetensors")]
        if name.startswith("model"):
            torch.save(load_file(file), os.path.join(path, stem + ".pt"))
        elif name.startswith("rng"):
            torch.save(read_rng_file(file), os.path.join(path, stem + ".pt"))
        if name.endswith(".safetensors") or name == "manifest.json":
            os.remove(file)


def test_an_older_checkpoint_is_refused_and_migrates_exactly(embedded, run_dir, tmp_path,
                                                            capsys):
    out = _copy(run_dir, tmp_path)
    path = step_path(out, 4)
    original = load_file(os.path.join(path, "model.safetensors"))
    rng = read_rng_file(os.path.join(path, "rng.safetensors"))
    _make_legacy(path)
    command = f"python tools/migrate_checkpoint.py {path}"
    cli = _cli(embedded, out, "--run.steps", "6")
    _assert_one_line(cli, f"{path} is a checkpoint of an older megarch: its pickled model.pt, "
                     "rng.pt could run code", command)
    with pytest.raises(EvalError, match="migrate_checkpoint.py"):
        load_for_eval(path, tokenizer="bytes")
    assert migrate_main([out]) == 0  # a run dir: every checkpoint (step 2 is current already)
    printed = capsys.readouterr().out
    assert f"{path}: converted" in printed and "already in the current format" in printed
    assert sorted(os.listdir(path)) == FILES and damage(path) is None
    migrated = load_file(os.path.join(path, "model.safetensors"))
    assert migrated.keys() == original.keys()
    assert all(torch.equal(migrated[k], v) for k, v in original.items())
    again = read_rng_file(os.path.join(path, "rng.safetensors"))
    assert again["python"] == rng["python"] and torch.equal(again["torch"], rng["torch"])
    assert np.array_equal(again["numpy"][1], rng["numpy"][1])
    assert again["numpy"][2:] == rng["numpy"][2:]
    assert _cli(embedded, out, "--run.steps", "6").returncode == 0  # resumes and goes on
    assert read_state(find_latest(out)).step == 6


@pytest.mark.parametrize("name", ["rng.pt", "model.pt"])
def test_a_malicious_older_checkpoint_is_refused_by_resume_and_migration(embedded, run_dir,
                                                                         tmp_path, name):
    out = _copy(run_dir, tmp_path)
    path = step_path(out, 4)
    _make_legacy(path)
    marker = tmp_path / "ran"
    _write_payload(os.path.join(path, name), str(marker))
    before = sorted(os.listdir(path))
    if name == "rng.pt":  # the case: the real CLI resuming the run
        _assert_one_line(_cli(embedded, out, "--run.steps", "6"), "migrate_checkpoint.py")
    else:
        with pytest.raises(CheckpointError, match="migrate_checkpoint.py"):
            _resume(embedded, out, path)
    migrate = subprocess.run([sys.executable, os.path.join(REPO, "tools", "migrate_checkpoint.py"),
                              path], env={**os.environ, "PYTHONPATH": REPO},
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 2 and "Traceback" not in migrate.stderr
    assert f"{name} " in migrate.stderr and "refused" in migrate.stderr
    assert sorted(os.listdir(path)) == before  # left as it was
    assert not marker.exists()


def _truncate(file: str) -> None:
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json"])
def test_an_explicit_resume_of_a_truncated_file_is_one_line(embedded, run_dir, tmp_path, name):
    out = _copy(run_dir, tmp_path)
    path = step_path(out, 4)
    _truncate(os.path.join(path, name))
    line = _assert_one_line(_cli(embedded, out, "--run.resume", path, "--run.steps", "6"),
                            os.path.join(path, name), "truncated")
    assert line.startswith(f"megarch-train: error: run.resume={path}: ")


def test_a_state_json_of_wrong_types_is_one_line(embedded, run_dir, tmp_path):
    out = _copy(run_dir, tmp_path)
    path = step_path(out, 4)
    state = os.path.join(path, "state.json")
    with open(state, "w") as f:
        json.dump({"step": "x"}, f)
    _assert_one_line(_cli(embedded, out, "--run.resume", path, "--run.steps", "6"),
                     state, "manifest.json records")
    write_manifest(path)  # sizes and checksums agree: the fields themselves are checked
    _assert_one_line(_cli(embedded, out, "--run.resume", path, "--run.steps", "6"),
                     state, "field 'step' is 'x' (str), not an integer")
    for values, problem in (({"step": 4, "consumed_samples": -1, "tokens_seen": 0,
                              "skipped_steps": 0}, "'consumed_samples' is -1, not >= 0"),
                            ({"step": 4, "consumed_samples": 8, "tokens_seen": 0,
                              "skipped_steps": 0, "epoch": 1}, "unknown field(s) epoch"),
                            ({"step": True, "consumed_samples": 8, "tokens_seen": 0,
                              "skipped_steps": 0}, "'step' is True (bool)"),
                            ([4], "holds list")):
        with open(state, "w") as f:
            json.dump(values, f)
        write_manifest(path)
        with pytest.raises(CheckpointError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            read_state(path)


def test_resume_auto_reports_a_damaged_newest_and_uses_the_previous(embedded, run_dir,
                                                                    tmp_path):
    out = _copy(run_dir, tmp_path)
    newest = step_path(out, 4)
    _truncate(os.path.join(newest, "optimizer.pt"))
    run = _cli(embedded, out, "--run.steps", "6")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    warning = [line for line in run.stdout.splitlines() if "is damaged" in line]
    assert len(warning) == 1, run.stdout
    assert os.path.join(newest, "optimizer.pt") in warning[0] and "truncated" in warning[0]
    assert step_path(out, 2) in warning[0]  # the one it resumed from
    assert os.path.isdir(newest + ".damaged")  # set aside, kept
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]  # steps 3, 4 trained again
    assert damage(newest) is None and read_state(find_latest(out)).step == 6


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(embedded, run_dir, tmp_path):
    out = _copy(run_dir, tmp_path)
    for step in (2, 4):
        _truncate(os.path.join(step_path(out, step), "model.safetensors"))
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        _resume(embedded, out, "auto")
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]  # nothing set aside


def test_rng_file_round_trip_with_cuda_states(tmp_path):
    """The CUDA generator states (one uint8 tensor per device) come back as saved; a file whose
    torch state is of another dtype is refused."""
    state = rng_state()
    state["cuda"] = [torch.randint(0, 256, (16,), dtype=torch.uint8) for _ in range(2)]
    file = str(tmp_path / "rng.safetensors")
    checkpoint_files.save_rng_file(state, file)
    back = read_rng_file(file)
    assert len(back["cuda"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(back["cuda"], state["cuda"], strict=True))
    state["torch"] = state["torch"].float()
    checkpoint_files.save_rng_file(state, file)
    with pytest.raises(CheckpointError, match="not a 1-D uint8 generator state"):
        read_rng_file(file)


def test_init_from_a_damaged_checkpoint_is_one_line(embedded, run_dir, tmp_path):
    out = _copy(run_dir, tmp_path)
    path = step_path(out, 4)
    _truncate(os.path.join(path, "model.safetensors"))
    run = _cli(embedded, str(tmp_path / "finetune"), "--run.init_from", path)
    _assert_one_line(run, os.path.join(path, "model.safetensors"), "truncated")


def test_a_sharded_older_checkpoint_migrates(run_dir, tmp_path):
    sharded = reshard(step_path(run_dir, 4), str(tmp_path / "tp2"), tp=2, pp=2)
    expected = sorted(os.listdir(sharded))
    reference, _ = load_model(sharded)
    _make_legacy(sharded)
    assert "model_tp01_pp01.pt" in os.listdir(sharded)
    with pytest.raises(CheckpointError, match="model_tp00_pp00.pt, model_tp00_pp01.pt"):
        load_model(sharded)
    assert migrate_main([sharded]) == 0
    assert sorted(os.listdir(sharded)) == expected and damage(sharded) is None
    migrated, _ = load_model(sharded)
    assert all(torch.equal(migrated.state_dict()[k], v)
               for k, v in reference.state_dict().items())
