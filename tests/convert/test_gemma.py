"""A rotary causal decoder exports as Hugging Face Gemma computing the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megarch.config.train import get_train_preset
from megarch.convert.cli import main
from megarch.convert.hf_t5 import import_transformers
from megarch.data.tokenizers import load_tokenizer
from megarch.model import build_model
from megarch.training.checkpoint import TrainState, save_checkpoint
from megarch.training.optim import build_optimizer


def _run(tmp_path, spiece: str, arch: str, tied: bool):
    cfg = get_train_preset("cd_flm_tiny" if arch == "causal_decoder" else "nd_plm_tiny")
    cfg.model.position, cfg.model.vocab_size, cfg.model.tie_embeddings = "rotary", 1024, tied
    cfg.model.n_layers, cfg.model.norm_eps = 3, 1e-5
    cfg.data.tokenizer = spiece
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # norms away from 1, so their rescaling is tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    run = str(tmp_path / "run")
    save_checkpoint(run, TrainState(), model, build_optimizer(cfg.optim, model), cfg.to_json())
    return run, model


@pytest.mark.parametrize("tied", [True, False])
def test_rotary_causal_decoder_is_gemma(tmp_path, spiece, tied, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, model = _run(tmp_path, spiece, "causal_decoder", tied)
    out = str(tmp_path / "gemma")
    assert main(["to-hf", run, out, "--quiet"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "gemma"
    transformers = import_transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == "GemmaForCausalLM"
    tokens = torch.randint(3, 1000, (2, 33))
    with torch.no_grad():
        expected = model(tokens=tokens)
        got = hf(input_ids=tokens).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x): return x  # {J}"
    assert hf_tok(text, add_special_tokens=False).input_ids == load_tokenizer(spiece).encode(text)


def test_a_non_causal_rotary_decoder_is_refused(tmp_path, spiece, capsys):
    run, _ = _run(tmp_path, spiece, "nonc_decoder", True)
    assert main(["to-hf", run, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.arch=nonc_decoder" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")
