"""HF T5 -> megarch: the converted checkpoint computes transformers' own logits."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from megarch.convert import ConvertError, from_hf
from megarch.convert.cli import main
from megarch.eval.loading import load_for_eval
from tests.convert.helpers import VOCAB, hf_config, hf_model, write_hf_dir


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(2, 1000, (2, 41), generator=g)  # long enough for the far buckets
    dec = torch.randint(2, 1000, (2, 29), generator=g)
    return enc, dec


def _check_logits(hf_dir: str, out: str) -> None:
    ref = hf_model(hf_dir)
    model, cfg, tok = load_for_eval(out)
    assert cfg.model.rel_bias_shared and tok.vocab_size == 1000
    enc, dec = _inputs()
    mask = torch.ones_like(enc)
    mask[1, 30:] = 0  # a padded encoder row
    seg = mask.clone()  # megarch: segment 0 = padding
    with torch.no_grad():
        expected = ref(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
        got = model(encoder_tokens=enc, decoder_tokens=dec, encoder_segment_ids=seg)
    assert got.shape == expected.shape == (2, 29, VOCAB)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5 * expected.abs().max().item(), diff


@pytest.mark.parametrize("tied", [True, False])
def test_imported_t5_gives_transformers_logits(tmp_path, spiece, tied):
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(tied, enc_layers=2, dec_layers=3), tokenizer=spiece)
    out = str(tmp_path / "out")
    from_hf(hf_dir, out)
    cfg = json.load(open(os.path.join(out, "checkpoints", "step_00000000", "config.json")))
    assert cfg["model"]["tie_embeddings"] is tied
    assert (cfg["model"]["n_layers"], cfg["model"]["n_decoder_layers"]) == (2, 3)
    assert cfg["model"]["norm_eps"] == 1e-5 and cfg["model"]["vocab_size"] == VOCAB
    _check_logits(hf_dir, out)


def test_pytorch_bin_weights_and_the_cli(tmp_path, spiece, capsys):
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(False, enc_layers=3, dec_layers=1), tokenizer=spiece,
                 weights="bin")
    out = str(tmp_path / "out")
    assert main(["from-hf", hf_dir, out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (" in printed
    assert f"megarch-train --preset ed_mtf --config {out}/model_config.json" in printed
    _check_logits(hf_dir, out)


def _fails(argv, capsys, *words) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("field, value, words", [
    ("feed_forward_proj", "relu", ("feed_forward_proj='relu'", "gated-gelu")),
    ("model_type", "bart", ("model_type='bart'", "t5", "gemma (GemmaForCausalLM")),
    ("num_key_value_heads", 2, ("num_key_value_heads=2", "no grouped-query attention")),
])
def test_unsupported_configs_are_refused_and_nothing_is_written(tmp_path, spiece, capsys,
                                                                field, value, words):
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(False), tokenizer=spiece)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config[field] = value
    json.dump(config, open(os.path.join(hf_dir, "config.json"), "w"))
    _fails(["from-hf", hf_dir, str(tmp_path / "out")], capsys, *words)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_bad_inputs_get_one_line_and_leave_nothing(tmp_path, spiece, capsys):
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(False), tokenizer=spiece)
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "x"), "w").close()
    _fails(["from-hf", hf_dir, out], capsys, "not empty")
    assert os.listdir(out) == ["x"]
    out = str(tmp_path / "new")
    os.rename(os.path.join(hf_dir, "model.safetensors"), str(tmp_path / "moved"))
    _fails(["from-hf", hf_dir, out], capsys, "no weights file", "model.safetensors")
    os.rename(str(tmp_path / "moved"), os.path.join(hf_dir, "model.safetensors"))
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    json.dump(config | {"vocab_size": 512}, open(os.path.join(hf_dir, "config.json"), "w"))
    _fails(["from-hf", hf_dir, out], capsys, "1000 ids", "vocabulary is 512")
    json.dump(config | {"num_layers": 3}, open(os.path.join(hf_dir, "config.json"), "w"))
    _fails(["from-hf", hf_dir, out], capsys, "encoder.block.2", "missing")
    json.dump(config | {"tie_word_embeddings": True},  # the file's head is its own
              open(os.path.join(hf_dir, "config.json"), "w"))
    _fails(["from-hf", hf_dir, out], capsys, "lm_head.weight differs", "tie_word_embeddings")
    assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(ConvertError, match="not a directory"):
        from_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_the_attention_kernel_computes_the_imported_t5(tmp_path, spiece, monkeypatch):
    """The scale folded into the queries: the kernel (the Triton interpreter here, the default
    on CUDA) gives transformers' logits too, relative bias read from the shared table."""
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(False, enc_layers=2, dec_layers=2, d_kv=16), tokenizer=spiece)
    out = str(tmp_path / "out")
    from_hf(hf_dir, out)
    ref = hf_model(hf_dir)
    model, _, _ = load_for_eval(out)
    g = torch.Generator().manual_seed(2)
    enc, dec = torch.randint(2, 1000, (1, 40), generator=g), torch.randint(2, 1000, (1, 24),
                                                                           generator=g)
    calls = []
    attention_module = importlib.import_module("megarch.model.attention")  # not the function
    kernel = attention_module._kernel_attention
    monkeypatch.setattr(attention_module, "_kernel_attention",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setenv("MEGARCH_ATTENTION", "kernel")
    with torch.no_grad():
        got = model(encoder_tokens=enc, decoder_tokens=dec)
        expected = ref(input_ids=enc, decoder_input_ids=dec).logits
    assert len(calls) == 2 + 2 * 2  # 2 encoder layers; 2 decoder layers: self and cross
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_python_dash_m_and_the_tool_run_the_cli(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo}
    for command in ([sys.executable, "-m", "megarch.convert"],
                    [sys.executable, os.path.join(repo, "tools", "convert_hf.py")]):
        proc = subprocess.run([*command, "from-hf", str(tmp_path / "none"), str(tmp_path / "o")],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith("megarch-convert: error:")
        assert "not a directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_greedy_generation_with_the_cache_is_transformers(tmp_path, spiece):
    """Incremental decoding (megarch's key/value cache, the shared table read at the cached
    positions) picks transformers' tokens. (transformers' own cache sizes itself by the
    encoder's depth and fails for a deeper decoder: its reference runs without one.)"""
    from megarch.eval.generation import GenerationOptions, generate

    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(True, enc_layers=2, dec_layers=3), tokenizer=spiece, seed=7)
    out = str(tmp_path / "out")
    from_hf(hf_dir, out)
    ref = hf_model(hf_dir)
    model, _, tok = load_for_eval(out)
    prompts = [tok.encode("def main(argv): return parse(argv)"), tok.encode("import os")]
    ours = generate(model, tok, prompts, GenerationOptions(max_new_tokens=30))
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt + [tok.eos_id]]), max_new_tokens=30,
                                  do_sample=False, num_beams=1, use_cache=False,
                                  suppress_tokens=list(range(tok.vocab_size, VOCAB)))
        expected = theirs[0, 1:].tolist()  # after the decoder start
        if tok.eos_id in expected:
            expected = expected[: expected.index(tok.eos_id) + 1]
        assert got == expected and len(got) >= 5


@pytest.mark.parametrize("family, drop", [("T5", "d_model"), ("Gemma", "hidden_size")])
def test_a_missing_config_field_is_one_error_naming_it(family, drop):
    from megarch.convert.hf_gemma import model_config_from_gemma
    from megarch.convert.hf_t5 import model_config_from_hf

    if family == "T5":
        hf, read = hf_config(False), model_config_from_hf
    else:
        hf = {"model_type": "gemma", "vocab_size": VOCAB, "hidden_size": 32,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
              "intermediate_size": 64, "num_hidden_layers": 2}
        read = model_config_from_gemma
        assert read(dict(hf), "x/config.json").n_kv_heads == 2  # complete: it reads
    del hf[drop]
    with pytest.raises(ConvertError, match=f"x/config.json: field '{drop}' is missing; a "
                                           f"{family} config has it"):
        read(hf, "x/config.json")
