"""megarch -> HF T5: the round trip gives every tensor back; transformers loads the export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from megarch.config.train import get_train_preset
from megarch.convert import from_hf
from megarch.convert.cli import main
from megarch.model import build_model
from megarch.training.checkpoint import TrainState, find_latest, save_checkpoint
from megarch.training.optim import build_optimizer
from megarch.training.resume import load_model
from tests.convert.helpers import hf_config, hf_model, write_hf_dir


def _read_export(out: str) -> dict[str, torch.Tensor]:
    index = os.path.join(out, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(os.path.join(out, file), framework="pt") as f:
            for name in f.keys():
                assert name not in tensors
                tensors[name] = f.get_tensor(name)
    return tensors


def _round_trip(tmp_path, spiece, tied: bool, *extra: str):
    hf_dir = str(tmp_path / "hf")
    original = write_hf_dir(hf_dir, hf_config(tied, enc_layers=3, dec_layers=2),
                            tokenizer=spiece, seed=3)
    run = str(tmp_path / "run")
    from_hf(hf_dir, run)
    out = str(tmp_path / "export")
    assert main(["to-hf", run, out, "--quiet", *extra]) == 0
    return hf_dir, original, out


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_every_tensor_back_and_transformers_loads_it(tmp_path, spiece, tied,
                                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir, original, out = _round_trip(tmp_path, spiece, tied)
    back = _read_export(out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        rel = (back[name] - tensor).abs().max() / tensor.abs().max()
        assert back[name].dtype == tensor.dtype and rel <= 1e-6, (name, rel)
    assert {"config.json", "generation_config.json", "spiece.model"} <= set(os.listdir(out))
    ours, theirs = hf_model(out), hf_model(hf_dir)
    enc = torch.randint(2, 1000, (2, 37))
    dec = torch.randint(2, 1000, (2, 23))
    with torch.no_grad():
        got = ours(input_ids=enc, decoder_input_ids=dec).logits
        expected = theirs(input_ids=enc, decoder_input_ids=dec).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_sharded_export_above_the_size_limit(tmp_path, spiece, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir, original, out = _round_trip(tmp_path, spiece, False, "--max-shard-size", "40KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and "model.safetensors" not in os.listdir(out)
    for shard in shards:  # each at most the limit, unless one tensor alone is bigger
        size = os.path.getsize(os.path.join(out, shard))
        with safe_open(os.path.join(out, shard), framework="pt") as f:
            assert size <= 40_000 + 4096 or len(list(f.keys())) == 1
    back = _read_export(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in back.values())
    for name, tensor in original.items():
        torch.testing.assert_close(back[name], tensor, rtol=1e-6, atol=0)
    model = hf_model(out)  # transformers reads the index
    torch.testing.assert_close(model.lm_head.weight.detach(), original["lm_head.weight"])
    again = str(tmp_path / "again")  # and so does from-hf: sharded safetensors in
    from_hf(out, again)
    first = load_model(find_latest(str(tmp_path / "run")))[0].state_dict()
    second = load_model(find_latest(again))[0].state_dict()
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-6, atol=0)


def _megarch_checkpoint(tmp_path, preset: str) -> str:
    cfg = get_train_preset(preset)
    cfg.model.vocab_size = 512
    run = str(tmp_path / preset)
    model = build_model(cfg.model)
    save_checkpoint(run, TrainState(), model, build_optimizer(cfg.optim, model), cfg.to_json())
    return run


@pytest.mark.parametrize("preset, words", [
    ("cd_flm_tiny", ("model.arch=causal_decoder with model.position=t5_relative",
                     "no Hugging Face architecture")),
    ("ed_mlm_tiny", ("model.rel_bias_shared=false",)),
])
def test_models_without_an_exact_hf_twin_are_refused(tmp_path, capsys, preset, words):
    run = _megarch_checkpoint(tmp_path, preset)
    out = str(tmp_path / "export")
    assert main(["to-hf", run, out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == [preset]


def test_a_grouped_query_encoder_decoder_is_refused(tmp_path, capsys):
    """T5 has no grouped-query attention: one line naming model.n_kv_heads, nothing written."""
    cfg = get_train_preset("ed_mlm_tiny")
    cfg.model.vocab_size, cfg.model.rel_bias_shared, cfg.model.n_kv_heads = 512, True, 2
    run = str(tmp_path / "gqa")
    model = build_model(cfg.model)
    save_checkpoint(run, TrainState(), model, build_optimizer(cfg.optim, model), cfg.to_json())
    out = str(tmp_path / "export")
    assert main(["to-hf", run, out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.n_kv_heads=2" in err, err
    assert "no grouped-query attention" in err and not os.path.exists(out)


def test_export_refuses_a_non_empty_out_and_a_tokenizer_too_big(tmp_path, spiece, capsys):
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(True), tokenizer=spiece)
    run = str(tmp_path / "run")
    from_hf(hf_dir, run)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("x")
    assert main(["to-hf", run, str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and os.listdir(busy) == ["keep"]
    small = _megarch_checkpoint(tmp_path, "ed_mlm_tiny")  # vocab 512 < the tokenizer's 1000
    cfg_path = os.path.join(small, "checkpoints", "step_00000000", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["rel_bias_shared"] = True
    json.dump(cfg, open(cfg_path, "w"))
    assert main(["to-hf", small, str(tmp_path / "e2"), "--tokenizer", spiece]) == 2
    assert "1000 ids" in capsys.readouterr().err and not os.path.exists(tmp_path / "e2")


def test_a_tensor_parallel_checkpoint_exports_the_same_tensors(tmp_path, spiece):
    """A TP2 layout (each rank: half the heads, d_ff columns, vocab rows and bias-table
    columns) is gathered by the parameters' partition: the export is the TP1 one."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools.reshard_checkpoint import reshard

    hf_dir = str(tmp_path / "hf")
    original = write_hf_dir(hf_dir, hf_config(False), tokenizer=spiece, seed=5)
    run = str(tmp_path / "run")
    from_hf(hf_dir, run)
    tp2 = str(tmp_path / "tp2")
    path = reshard(run, tp2, tp=2)
    assert any(f.startswith("model_tp01_pp00.") for f in os.listdir(path))
    out = str(tmp_path / "export")
    assert main(["to-hf", tp2, out, "--quiet"]) == 0
    back = _read_export(out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        torch.testing.assert_close(back[name], tensor, rtol=1e-6, atol=0)
