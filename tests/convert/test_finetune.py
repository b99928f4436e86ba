"""A converted T5 finetunes with ``megarch-train --run.init_from`` and evaluates with
``megarch-eval``: the README's commands, in process."""

from __future__ import annotations

import json
import os

from megarch.cli.data import main as data_cli
from megarch.convert.cli import main as convert
from megarch.eval.cli import main as evaluate
from megarch.eval.loading import load_for_eval
from megarch.train import main as train
from megarch.training.checkpoint import find_latest, read_lineage
from megarch.training.logging import read_metrics
from tests.adapt.test_mtf import write_prompted
from tests.convert.helpers import hf_config, hf_model, write_hf_dir


def test_mtf_from_a_converted_t5_then_evaluation_and_export(tmp_path, spiece, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    write_hf_dir("t5", hf_config(False, enc_layers=2, dec_layers=2), tokenizer=spiece)
    assert convert(["from-hf", "t5", "t5_megarch", "--quiet"]) == 0
    write_prompted("prompted.jsonl", 40, seed=1)
    assert data_cli(["preprocess", "--input", "prompted.jsonl", "--output", "prompted",
                     "--tokenizer", "t5_megarch/spiece.model", "--json-keys", "inputs",
                     "targets", "--workers", "1", "-q"]) == 0
    argv = ["--preset", "ed_mtf", "--config", "t5_megarch/model_config.json",
            "--run.init_from", "t5_megarch", "--data.paths", "prompted",
            "--run.out_dir", "mtf", "--data.split", "1,0,0", "--data.inputs_len", "24",
            "--data.targets_len", "8", "--data.num_workers", "0", "--run.micro_batch", "4",
            "--run.global_batch", "8", "--run.steps", "12", "--run.eval_batches", "0",
            "--run.log_every", "1000", "--run.save_every", "12", "--run.precision", "fp32",
            "--model.dropout", "0.0", "--optim.lr", "1e-2", "-q"]
    assert train(argv) == 0
    losses = [r["loss"] for r in read_metrics("mtf")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    stages = read_lineage(find_latest("mtf"))["stages"]
    assert [(s["stage"], s["objective"]) for s in stages] == [("pretrain", "mlm"),
                                                               ("mtf", "multitask")], stages
    assert stages[0]["imported_from"] == os.path.abspath("t5")

    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompts": ["Reverse: red cat one sun"],
                                "choices": ["sun one cat red", "red blue dog"], "label": 0}))
    for checkpoint in ("t5_megarch", "mtf"):
        assert evaluate(["--checkpoint", checkpoint, "--tasks", str(task), "--output",
                         f"{checkpoint}.json", "-q", "--device", "cpu"]) == 0
        assert json.load(open(f"{checkpoint}.json"))["tasks"]["task"]["n_examples"] == 1
    model, cfg, tok = load_for_eval("mtf")
    assert cfg.model.rel_bias_shared and tok.spec.endswith("spiece.model")

    assert convert(["to-hf", "mtf", "mtf_hf", "--quiet"]) == 0  # the finetuned model, for HF
    import torch

    hf = hf_model("mtf_hf")
    enc = torch.tensor([tok.encode("Reverse: red cat one sun")])
    dec = torch.tensor([[tok.pad_id, *tok.encode("sun one")]])
    with torch.no_grad():
        expected = model(encoder_tokens=enc, decoder_tokens=dec)
        got = hf(input_ids=enc, decoder_input_ids=dec).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
