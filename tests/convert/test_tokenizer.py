"""Tokenizers across the bridge: HF's T5 tokenizer ids equal megarch's, both ways."""

from __future__ import annotations

import json
import os

import pytest

from megarch.convert import from_hf
from megarch.convert.cli import main
from megarch.convert.hf_t5 import import_transformers
from megarch.eval.loading import load_for_eval
from tests.convert.helpers import hf_config, write_hf_dir

EXTRA = ["Hello  world\n\ttabs  \u00fcn\u00efc\u00f6d\u00e9 \U0001F600 {J} ok", " leading space",
         "", "x" * 300]


def _texts(corpus_jsonl: str) -> list[str]:
    with open(corpus_jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:80] + EXTRA


def _same_ids(hf_tok, tok, texts) -> None:
    for text in texts:
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text), text[:60]
    assert len(hf_tok) == tok.vocab_size
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (tok.pad_id, tok.eos_id)
    for k in (0, 1, 57, 99):  # sentinels count down from the top in both
        assert hf_tok.convert_tokens_to_ids(f"<extra_id_{k}>") == tok.vocab_size - 1 - k


def test_hf_t5_tokenizer_becomes_the_checkpoints(tmp_path, t5_spiece, corpus_jsonl):
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(False), tokenizer=t5_spiece)
    out = str(tmp_path / "run")
    from_hf(hf_dir, out)
    _, cfg, tok = load_for_eval(out)
    assert cfg.data.tokenizer == os.path.join(out, "spiece.model")
    hf_tok = import_transformers().T5Tokenizer.from_pretrained(hf_dir)  # transformers' own
    _same_ids(hf_tok, tok, _texts(corpus_jsonl))


@pytest.mark.parametrize("kind", ["t5", "byte_fallback"])
def test_export_writes_a_tokenizer_autotokenizer_reads_with_megarchs_ids(
        tmp_path, t5_spiece, spiece, corpus_jsonl, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir = str(tmp_path / "hf")
    write_hf_dir(hf_dir, hf_config(True), tokenizer=t5_spiece if kind == "t5" else spiece)
    run = str(tmp_path / "run")
    from_hf(hf_dir, run)
    out = str(tmp_path / "export")
    assert main(["to-hf", run, out, "--quiet"]) == 0
    _, _, tok = load_for_eval(run)
    hf_tok = import_transformers().AutoTokenizer.from_pretrained(out)
    _same_ids(hf_tok, tok, _texts(corpus_jsonl))
    ids = tok.encode(EXTRA[0])
    if kind == "byte_fallback":  # every character encodes (T5's model gives unk, shown apart)
        assert tok.unk_id not in ids and hf_tok.decode(ids) == tok.decode(ids)
