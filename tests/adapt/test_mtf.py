"""Multitask finetuning: from a pretrained checkpoint, on a capped mixture of prompted sets."""

from __future__ import annotations

import json
import random

import pytest

from megarch.config.overrides import apply_overrides
from megarch.config.train import get_train_preset
from megarch.data.preprocess import preprocess
from megarch.data.samples import MultitaskSamples
from megarch.training.adapt import StagedTrainer, resolve_mixture
from megarch.training.checkpoint import find_latest, read_lineage, read_state
from megarch.training.logging import read_metrics

WORDS = "red green blue cat dog bird one two three sun moon star".split()


def write_prompted(path: str, n: int, seed: int) -> None:
    """``n`` prompted examples of a learnable task: repeat the words in reverse order."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 4)
            f.write(json.dumps({"inputs": "Reverse: " + " ".join(words),
                                "targets": " ".join(reversed(words))}) + "\n")


@pytest.fixture(scope="module")
def prompted(embedded, tmp_path_factory) -> list[str]:
    """Two preprocessed prompted datasets of 60 and 20 examples."""
    directory = tmp_path_factory.mktemp("prompted")
    prefixes = []
    for name, n in (("big", 60), ("small", 20)):
        jsonl = str(directory / f"{name}.jsonl")
        write_prompted(jsonl, n, seed=n)
        prefix = str(directory / name)
        preprocess(jsonl, prefix, embedded[1], json_keys=("inputs", "targets"), progress=False)
        prefixes.append(prefix)
    return prefixes


def mtf_config(prompted: list[str], embedded, init_from: str, out_dir: str, steps: int):
    """The tiny MTF preset on the prompted sets, starting from ``init_from``."""
    cfg = get_train_preset("cd_mtf_tiny")
    return apply_overrides(cfg, [
        "--data.paths", ",".join(prompted), "--data.tokenizer", embedded[1],
        "--data.split", "1,0,0", "--data.mixture_cap", "30", "--data.inputs_len", "24",
        "--data.targets_len", "8", "--run.eval_batches", "0", "--run.micro_batch", "4",
        "--run.global_batch", "8", "--run.steps", str(steps), "--run.out_dir", out_dir,
        "--run.log_every", "1000", "--run.init_from", init_from,
    ])


def test_mixture_weights_are_capped_example_counts(prompted, embedded, tmp_path):
    cfg = mtf_config(prompted, embedded, "unused", str(tmp_path), 1)
    assert resolve_mixture(cfg.data) == [30.0, 20.0]  # min(60, 30), min(20, 30)
    cfg.data.weights = [1.0, 1.0]
    assert resolve_mixture(cfg.data) == [1.0, 1.0]  # explicit weights win


def test_mtf_from_a_pretrained_checkpoint(prompted, embedded, cd_flm_run, tmp_path):
    out = str(tmp_path / "mtf")
    cfg = mtf_config(prompted, embedded, cd_flm_run, out, 16)
    assert (cfg.data.objective, cfg.model.dropout, cfg.optim.name, cfg.optim.schedule) == (
        "multitask", 0.1, "adafactor", "constant")
    trainer = StagedTrainer(cfg)
    assert cfg.data.weights == [30.0, 20.0]
    # the objective is wired: packed prompted rows whose loss covers the targets only
    assert all(isinstance(d, MultitaskSamples) for d in trainer.train_data.datasets)
    result = trainer.train()
    assert result.state.step == 16  # step 0 and a fresh optimizer: weights only
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    checkpoint = find_latest(out)
    lineage = read_lineage(checkpoint)
    assert [(s["stage"], s["objective"]) for s in lineage["stages"]] == [
        ("pretrain", "flm"), ("mtf", "multitask")]
    assert lineage["stages"][1]["from_checkpoint"] == find_latest(cd_flm_run)
    assert lineage["stages"][1]["start_step"] == 0
    assert lineage["tokens_by_objective"]["multitask"] == read_state(checkpoint).tokens_seen


def test_mtf_presets_follow_the_study():
    for arch in ("cd", "nd", "ed"):
        cfg = get_train_preset(f"{arch}_mtf").validate()
        assert (cfg.data.objective, cfg.data.inputs_len, cfg.data.targets_len) == (
            "multitask", 1024, 256)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule) == ("adafactor", 1e-3,
                                                                       "constant")
        assert (cfg.model.dropout, cfg.run.steps, cfg.data.mixture_cap) == (0.1, 10_000,
                                                                          500_000)
        assert get_train_preset(f"{arch}_mtf_tiny").validate().data.objective == "multitask"
