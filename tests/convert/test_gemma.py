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
from megarch.training.checkpoint import TrainState, find_latest, save_checkpoint
from megarch.training.optim import build_optimizer
from megarch.training.resume import load_model


def _run(tmp_path, spiece: str, arch: str, tied: bool, kv_heads: int | None = None):
    cfg = get_train_preset("cd_flm_tiny" if arch == "causal_decoder" else "nd_plm_tiny")
    cfg.model.position, cfg.model.vocab_size, cfg.model.tie_embeddings = "rotary", 1024, tied
    cfg.model.n_kv_heads = kv_heads
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


@pytest.mark.parametrize(("kv_heads", "tied"), [(2, True), (1, False)])
def test_grouped_query_decoder_round_trips_through_gemma(tmp_path, spiece, kv_heads, tied,
                                                         monkeypatch):
    """n_kv_heads < n_heads exports as Gemma's num_key_value_heads (HF repeats the KV heads
    itself: same logits), and from-hf reads it back: same config, same weights, same logits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, model = _run(tmp_path, spiece, "causal_decoder", tied, kv_heads)
    out = str(tmp_path / "gemma")
    assert main(["to-hf", run, out, "--quiet"]) == 0
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert (hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]) == (4, kv_heads)
    hf = import_transformers().AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 16, 64)
    tokens = torch.randint(3, 1000, (2, 33))
    with torch.no_grad():
        expected = model(tokens=tokens)
        assert (hf(input_ids=tokens).logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    back_dir = str(tmp_path / "back")
    assert main(["from-hf", out, back_dir]) == 0
    back, cfg = load_model(find_latest(back_dir))
    assert (cfg.model.arch, cfg.model.n_kv_heads, cfg.model.tie_embeddings) == (
        "causal_decoder", kv_heads, tied)
    original = model.state_dict()
    assert sorted(back.state_dict()) == sorted(original)
    for name, tensor in back.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=1e-6, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens=tokens), expected, rtol=1e-5, atol=1e-5)


def test_a_multi_query_gemma_built_by_transformers_imports(tmp_path, spiece):
    """A Gemma made by transformers from a config alone (num_key_value_heads 1 of 4 heads,
    random weights, untied head) imports computing its logits."""
    transformers = import_transformers()
    torch.manual_seed(0)
    hf_cfg = transformers.GemmaConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5,
        tie_word_embeddings=False)
    hf = transformers.GemmaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 0 (Gemma's 1 + weight), a head of its own
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name == "lm_head.weight":
                p.copy_(0.5 * torch.randn_like(p))
    hf_dir = str(tmp_path / "hf")
    hf.save_pretrained(hf_dir)
    out = str(tmp_path / "run")
    assert main(["from-hf", hf_dir, out, "--tokenizer", spiece]) == 0
    model, cfg = load_model(find_latest(out))
    assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.kv_dim) == (4, 1, 8)
    assert model.blocks[0].attn.k.weight.shape == (8, 32)
    tokens = torch.randint(3, 1000, (2, 21))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        got = model(tokens=tokens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
