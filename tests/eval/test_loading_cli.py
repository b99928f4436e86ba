"""Loading a checkpoint for evaluation, and the megarch-eval command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megarch.config.presets import tiny_model
from megarch.config.train import TrainConfig
from megarch.eval.aggregate import aggregate
from megarch.eval.cli import main
from megarch.eval.loading import EvalError, load_for_eval
from megarch.eval.rank_classification import RankOptions, rank_classify
from megarch.eval.tasks import load_task
from megarch.training.checkpoint import (
    TrainState,
    save_checkpoint,
)
from megarch.training.checkpoint_files import (
    write_manifest,
)
from tests.eval.helpers import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save_run(out_dir: str, arch: str, step: int = 5, tokenizer: str = "bytes", seed: int = 0):
    cfg = TrainConfig(model=tiny_model(arch))
    cfg.data.tokenizer = tokenizer
    cfg.data.layout = "encoder_decoder" if arch == "encoder_decoder" else "decoder"
    cfg.data.objective = "plm"
    cfg.data.seq_len = 64
    model = tiny(arch, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(out_dir, TrainState(step=step), model, optimizer, cfg.to_json())
    return path, model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    _save_run(out, "nonc_decoder", step=5, seed=3)
    path, model = _save_run(out, "nonc_decoder", step=10, seed=4)
    return out, path, model


def test_load_newest_checkpoint_of_an_out_dir(run_dir):
    out, path, original = run_dir
    for where in (out, os.path.join(out, "checkpoints"), path):
        model, cfg, tok = load_for_eval(where)
        assert not model.training and cfg.model.arch == "nonc_decoder" and tok.name == "bytes"
        tokens = torch.tensor([[0, 5, 6, 7]])
        with torch.no_grad():
            assert torch.equal(model(tokens=tokens, prefix_len=torch.tensor([2])),
                               original(tokens=tokens, prefix_len=torch.tensor([2])))


def test_loading_errors(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        load_for_eval(str(tmp_path / "nowhere"))
    with pytest.raises(EvalError, match="neither a checkpoint"):
        load_for_eval(str(tmp_path))
    path, _ = _save_run(str(tmp_path / "a"), "causal_decoder", tokenizer="gone/spiece.model")
    with pytest.raises(EvalError, match="--tokenizer"):
        load_for_eval(path)
    model, _, _ = load_for_eval(path, tokenizer="bytes")
    other, _ = _save_run(str(tmp_path / "b"), "encoder_decoder")
    os.replace(os.path.join(other, "model.safetensors"), os.path.join(path, "model.safetensors"))
    with pytest.raises(EvalError, match="model.safetensors has .*, manifest.json records"):
        load_for_eval(path, tokenizer="bytes")  # another file than the one the manifest lists
    write_manifest(path)  # the manifest made to list it: a whole checkpoint of another model
    with pytest.raises(EvalError, match="does not match"):
        load_for_eval(path, tokenizer="bytes")


def _tasks(tmp_path) -> list[str]:
    rte = tmp_path / "rte.jsonl"
    rte.write_text("\n".join(json.dumps(r) for r in [
        {"prompts": ["It rains. Wet?", "Rain => wet?"], "choices": [" yes", " no"], "label": 0},
        {"prompts": ["Sun. Wet?", "Sun => wet?"], "choices": [" yes", " no"], "label": 1},
        {"template": ["{p} {h}?", "{h} given {p}?"], "fields": {"p": "Snow", "h": "cold"},
         "choices": [" yes", " no"], "label": 0},
    ]), encoding="utf-8")
    copa = tmp_path / "copa.jsonl"
    copa.write_text(json.dumps({"prompts": ["The glass fell, so"],
                                "choices": [" it broke", " it sang", " it flew"], "label": 0}),
                    encoding="utf-8")
    return [str(rte), str(copa)]


@pytest.mark.parametrize("normalize", [False, True])
def test_cli_writes_the_results_it_prints(run_dir, tmp_path, capsys, normalize):
    out, _, _ = run_dir
    tasks = _tasks(tmp_path)
    output = str(tmp_path / "results.json")
    argv = ["--checkpoint", out, "--tasks", *tasks, "--batch-size", "3", "--output", output,
            "-q"] + (["--normalize"] if normalize else [])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with open(output, encoding="utf-8") as f:
        results = json.load(f)
    model, cfg, tok = load_for_eval(out)
    options = RankOptions.for_run(cfg)  # a PLM run: no prompt EOS, EOS before the prompt
    assert (options.prompt_eos, options.decoder_start, options.max_len) == (False, "eos", 64)
    expected = aggregate({t.name: rank_classify(model, tok, t, options)
                          .prompt_accuracies(normalize) for t in map(load_task, tasks)})
    assert set(results["tasks"]) == {"rte", "copa"}
    for name, task in expected["tasks"].items():
        assert results["tasks"][name]["prompt_accuracies"] == task["prompt_accuracies"]
    assert results["average"] == pytest.approx(expected["average"])
    assert results["settings"]["normalize"] is normalize
    assert results["settings"]["prompt_eos"] is False
    assert results["settings"]["decoder_start"] == "eos"
    assert results["tasks"]["copa"]["n_examples"] == 1
    assert "rte" in printed and f"{100 * expected['average']:.1f}" in printed
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys):
    out, _, _ = run_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompts": ["p"], "choices": ["a", "b"], "label": 5}\n', encoding="utf-8")
    cases = (
        (["--checkpoint", out, "--tasks", str(bad)], "bad.jsonl:1: field \"label\"=5"),
        (["--checkpoint", str(tmp_path / "none"), "--tasks", *_tasks(tmp_path)], "not found"),
        (["--checkpoint", out, "--tasks", *_tasks(tmp_path), "--batch-size", "0"],
         "--batch-size 0"),
    )
    for argv, what in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("megarch-eval: error: ") and "\n" not in err
        assert what in err


def test_python_dash_m_runs_the_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "megarch.eval", "--checkpoint", str(tmp_path), "--tasks",
         str(bad)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 2
    assert "bad.jsonl:1: not valid JSON" in proc.stderr


def test_relative_tokenizer_is_found_beside_the_run(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "yes": 3, "no": 4}
    hf = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = Whitespace()
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    path, _ = _save_run(str(tmp_path / "run"), "causal_decoder", tokenizer="tok/tokenizer.json")
    assert not os.path.exists("tok/tokenizer.json")  # not from the test's working directory
    _, _, tok = load_for_eval(path)
    assert tok.vocab_size == 5 + 100 and tok.encode("yes no") == [3, 4]


def test_cli_format_flags_override_the_run(run_dir, tmp_path, capsys):
    out, _, _ = run_dir
    output = str(tmp_path / "r.json")
    argv = ["--checkpoint", out, "--tasks", *_tasks(tmp_path), "--output", output, "-q",
            "--prompt-eos", "--no-choice-eos", "--decoder-start", "bos", "--max-len", "20"]
    assert main(argv) == 0
    with open(output, encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    assert (settings["prompt_eos"], settings["choice_eos"], settings["decoder_start"],
            settings["max_len"]) == (True, False, "bos", 20)
