"""Fixtures of the bridge tests: a tiny T5-layout SentencePiece model."""

from __future__ import annotations

import pytest

from megarch.data.corpus import build_stdlib_corpus
from megarch.data.tokenizers import train_sentencepiece

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corpus") / "stdlib.jsonl")
    build_stdlib_corpus(path, max_docs=120, progress=False)
    return path


@pytest.fixture(scope="session")
def spiece(corpus_jsonl, tmp_path_factory) -> str:
    """A 1,000-id tokenizer (900 pieces + 100 sentinels), T5's layout."""
    prefix = str(tmp_path_factory.mktemp("sp") / "spiece")
    return train_sentencepiece([corpus_jsonl], prefix, vocab_size=1000, progress=False,
                               num_threads=1)


@pytest.fixture(scope="session")
def t5_spiece(corpus_jsonl, tmp_path_factory) -> str:
    """A 900-piece SentencePiece model as T5's spiece.model is made: no byte fallback."""
    import json

    import sentencepiece as spm

    with open(corpus_jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    prefix = str(tmp_path_factory.mktemp("t5sp") / "spiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=900, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False, num_threads=1, minloglevel=2,
        max_sentence_length=100000)
    return prefix + ".model"
