"""The lm-evaluation-harness model: offline on a local task, equal to megarch-eval's scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval imports datasets
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from megarch.eval.generation import GenerationOptions, generate  # noqa: E402
from megarch.eval.lm_eval_adapter import MegarchLM, rolling_windows  # noqa: E402
from megarch.eval.rank_classification import RankOptions, rank_classify  # noqa: E402
from megarch.eval.tasks import Example, Task  # noqa: E402
from tests.eval.helpers import reference_logprob  # noqa: E402
from tests.eval.test_loading_cli import _save_run  # noqa: E402

DOCS = [
    {"question": "Is fire hot?", "choices": ["yes", "no"], "label": 0},
    {"question": "Is ice hot?", "choices": ["yes", "no", "maybe"], "label": 1},
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
]
TASK_YAML = """task: megarch_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    checkpoint, _ = _save_run(str(root / "run"), "nonc_decoder", seed=5)
    data = root / "toy.json"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return root, checkpoint, str(tasks)


def _megarch_eval_scores(checkpoint: str) -> tuple[list[list[float]], float]:
    """The same questions through megarch-eval's rank classification (harness conventions:
    the choice follows a space, no EOS after it)."""
    lm = MegarchLM(checkpoint=checkpoint)
    task = Task("toy", "-", [Example([d["question"]], [[" " + c for c in d["choices"]]],
                                     d["label"]) for d in DOCS])
    options = RankOptions.for_run(lm.config, choice_eos=False)
    assert options.max_len == lm.max_length and options.prompt_eos is False  # a PLM run
    scores = rank_classify(lm.model, lm.tok, task, options)
    return ([[s.logprob for s in ex] for ex in scores.scores[0]],
            scores.prompt_accuracies()[0])


def test_simple_evaluate_matches_megarch_eval(setup):
    from lm_eval.tasks import TaskManager

    root, checkpoint, tasks = setup
    results = lm_eval.simple_evaluate(
        model="megarch", model_args={"checkpoint": checkpoint}, tasks=["megarch_toy"],
        task_manager=TaskManager(include_path=tasks, include_defaults=False),
        log_samples=True, batch_size=2,
    )
    samples = sorted(results["samples"]["megarch_toy"], key=lambda s: s["doc_id"])
    expected, accuracy = _megarch_eval_scores(checkpoint)
    for sample, want in zip(samples, expected, strict=True):
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-5)
    assert results["results"]["megarch_toy"]["acc,none"] == pytest.approx(accuracy)


def test_rolling_and_generation_use_megarch_code(setup):
    _, checkpoint, _ = setup
    lm = MegarchLM(checkpoint=checkpoint, max_length="16", batch_size="auto")
    tok, model = lm.tok, lm.model
    text = "a text longer than one window of sixteen"
    ids = tok.encode(text)
    windows = rolling_windows(ids, 15)
    assert [t for _, cont in windows for t in cont] == ids
    assert all(len(c) + len(t) <= 15 for c, t in windows)
    # A PLM run: contexts without EOS after them, sequences starting with EOS.
    expected = sum(reference_logprob(model, c, t, tok.vocab_size, tok.eos_id)
                   for c, t in windows)
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert got == pytest.approx(expected, abs=1e-4)
    request = SimpleNamespace(args=("Say:", {"until": ["x"], "max_gen_toks": 5}))
    options = GenerationOptions.for_run(lm.config, max_new_tokens=5, max_len=16)
    out = generate(model, tok, [tok.encode("Say:")], options)[0]
    text_out = tok.decode(out, show_special=False)
    assert lm.generate_until([request]) == [text_out.split("x")[0]]
    assert lm.loglikelihood([SimpleNamespace(args=("ctx", ""))]) == [(0.0, True)]
    # edge requests answer instead of aborting the harness run
    assert lm.generate_until([SimpleNamespace(args=("Say:", {"max_gen_toks": 0}))]) == [""]


def test_encoder_decoder_generates_from_an_empty_context(tmp_path):
    """An empty context (prompt_eos off, as a PLM run): the encoder gets EOS, as in
    loglikelihood, and the output is the model's greedy one for that input."""
    checkpoint, _ = _save_run(str(tmp_path / "ed"), "encoder_decoder", seed=2)
    lm = MegarchLM(checkpoint=checkpoint, max_length="32", prompt_eos="false")
    request = SimpleNamespace(args=("", {"until": [], "max_gen_toks": 4}))
    (text,) = lm.generate_until([request])
    options = GenerationOptions.for_run(lm.config, max_new_tokens=4, max_len=32,
                                        prompt_eos=False)
    ids = generate(lm.model, lm.tok, [[lm.tok.eos_id]], options)[0]
    assert text == lm.tok.decode(ids, show_special=False)


def _stock_lm_eval() -> list[str]:
    """The harness's own console script of this environment (``python -m lm_eval`` if absent)."""
    script = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "lm_eval"]


@pytest.mark.parametrize("command", [
    pytest.param("lm_eval", id="stock-lm_eval"),
    pytest.param("megarch-lm-eval", id="megarch-front", marks=pytest.mark.slow),
])
def test_lm_eval_command_line_offline(setup, command):
    root, checkpoint, tasks = setup
    out = root / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    launcher = (_stock_lm_eval() if command == "lm_eval"
                else [sys.executable, "-m", "megarch.eval.lm_eval_adapter"])
    proc = subprocess.run(
        [*launcher, "--model", "megarch",
         "--model_args", f"checkpoint={checkpoint}", "--tasks", "megarch_toy",
         "--include_path", tasks, "--output_path", str(out), "--batch_size", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "megarch_toy" in proc.stdout
    (result_file,) = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                      if f.startswith("results_")]
    with open(result_file, encoding="utf-8") as f:
        acc = json.load(f)["results"]["megarch_toy"]["acc,none"]
    assert acc == pytest.approx(_megarch_eval_scores(checkpoint)[1])


def test_start_up_hook_is_installed_and_light():
    """The installed .pth hook registers megarch lazily: a bare interpreter start imports
    neither lm-eval nor torch, and lm-eval's own lookup then finds MegarchLM."""
    import site

    from megarch.lm_eval_plugin import MODEL_PATH

    pth = [os.path.join(d, "megarch-lm-eval.pth") for d in site.getsitepackages()]
    assert any(os.path.isfile(p) for p in pth), (
        f"none of {pth} exists: reinstall megarch (pip install -e .) to get the lm_eval hook")
    code = (
        "import sys\n"
        "assert 'torch' not in sys.modules and 'lm_eval' not in sys.modules\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "cls = get_model('megarch')\n"
        "print(f'{cls.__module__}:{cls.__name__}')\n"
        "print('hf' in model_registry)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [MODEL_PATH, "True"]  # lm-eval's own models still there
