"""Tokenizers against the raw libraries, UTF-8 bytes and hand-computed T5 ids."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawHF
from tokenizers import decoders, models, pre_tokenizers, trainers

from megarch.data.corpus import build_stdlib_corpus
from megarch.data.errors import DataError
from megarch.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
    training_sentences,
)

SENTINELS = [f"<extra_id_{k}>" for k in range(100)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list[str]]:
    path = str(tmp_path_factory.mktemp("corpus") / "stdlib.jsonl")
    build_stdlib_corpus(path, max_docs=250, progress=False)
    with open(path, encoding="utf-8") as f:
        return path, [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    return train_sentencepiece([corpus[0]], prefix, vocab_size=1000, progress=False)


def _hf_json(path: str, texts: list[str], specials: list[str], added: list[str] = ()) -> str:
    """A small SentencePiece-style BPE tokenizer.json built with the tokenizers library."""
    raw = RawHF(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    if added:
        raw.add_special_tokens(list(added))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw.save(path)
    return path


@pytest.fixture(scope="module")
def hf_paths(corpus, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    texts = corpus[1]
    base = ["<pad>", "</s>", "<unk>"]
    return {
        "plain": _hf_json(str(root / "plain" / "tokenizer.json"), texts, base),
        # T5's layout: <extra_id_99> first, so <extra_id_0> lands on the top id.
        "t5": _hf_json(str(root / "t5" / "tokenizer.json"), texts, base, SENTINELS[::-1]),
        "wrong": _hf_json(str(root / "wrong" / "tokenizer.json"), texts, base, SENTINELS),
        "gpt": _hf_json(str(root / "gpt" / "tokenizer.json"), texts, ["<|endoftext|>"]),
    }


@pytest.fixture(scope="module")
def tokenizers_by_kind(sp_model, hf_paths) -> dict[str, Tokenizer]:
    return {
        "bytes": ByteTokenizer(),
        "sp": SentencePieceTokenizer(sp_model),
        "hf": HFTokenizer(hf_paths["plain"]),
        "hf_t5": HFTokenizer(hf_paths["t5"]),
    }


def _expected_top(kind: str, sp_model: str, hf_paths: dict[str, str]) -> int:
    """Id of <extra_id_0>, computed from the raw libraries (or by hand for bytes)."""
    if kind == "bytes":
        return 3 + 256 + 99
    if kind == "sp":
        return spm.SentencePieceProcessor(model_file=sp_model).get_piece_size() + 99
    raw = RawHF.from_file(hf_paths["plain" if kind == "hf" else "t5"])
    if kind == "hf":
        return max(raw.get_vocab().values()) + 1 + 99
    return raw.token_to_id("<extra_id_0>")


@pytest.mark.parametrize("kind", ["bytes", "sp", "hf", "hf_t5"])
def test_sentinels_count_down_from_the_top(kind, tokenizers_by_kind, sp_model, hf_paths):
    tok = tokenizers_by_kind[kind]
    top = _expected_top(kind, sp_model, hf_paths)
    assert tok.vocab_size == top + 1
    assert tok.sentinel_id(0) == top
    assert tok.sentinel_id(99) == top - 99 == tok.vocab_size - 100
    ids = np.arange(tok.vocab_size)
    assert np.array_equal(np.flatnonzero(tok.is_sentinel(ids)), np.arange(top - 99, top + 1))
    for k in (0, 1, 57, 99):
        assert tok.id_to_piece(tok.sentinel_id(k)) == f"<extra_id_{k}>"
        assert tok.decode([tok.sentinel_id(k)]) == f"<extra_id_{k}>"
    assert tok.bos_id == tok.pad_id
    with pytest.raises(ValueError):
        tok.sentinel_id(100)


def test_hf_t5_layout_uses_the_files_own_sentinels(hf_paths):
    raw = RawHF.from_file(hf_paths["t5"])
    tok = HFTokenizer(hf_paths["t5"])
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert [tok.sentinel_id(k) for k in range(100)] == [raw.token_to_id(s) for s in SENTINELS]


def test_byte_tokenizer_is_utf8_plus_three():
    tok = ByteTokenizer()
    text = "naïve café — 東京 🚀\n"
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.unk_id) == (359, 0, 1, 2)
    assert tok.encode(text) == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "", "a"]) == [tok.encode(text), [], [ord("a") + 3]]
    # a truncated multi-byte character decodes with a replacement character
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    assert tok.decode([2]) == "\ufffd"


def test_sentencepiece_matches_library_on_corpus_text(corpus, sp_model):
    texts = corpus[1][:60]
    raw = spm.SentencePieceProcessor(model_file=sp_model)
    tok = SentencePieceTokenizer(sp_model)
    assert tok.encode_batch(texts) == [raw.encode(t) for t in texts]
    for text in texts[:20]:
        ids = tok.encode(text)
        assert ids == raw.encode(text)
        assert tok.decode(ids) == raw.decode(ids)
    # T5 normalisation only collapses whitespace: the words survive the round trip
    assert tok.decode(tok.encode(texts[0])).split() == texts[0].split()


def test_hf_matches_library_on_corpus_text(corpus, hf_paths):
    texts = corpus[1][:60]
    raw = RawHF.from_file(hf_paths["t5"])
    tok = HFTokenizer(hf_paths["t5"])
    expected = [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts[:20]] == expected[:20]
    assert tok.decode(expected[3]) == raw.decode(expected[3], skip_special_tokens=False)


@pytest.mark.parametrize("kind", ["bytes", "sp", "hf", "hf_t5"])
def test_decode_shows_specials(kind, tokenizers_by_kind):
    tok = tokenizers_by_kind[kind]
    a, b = tok.encode("hello world"), tok.encode("again")
    ids = a + [tok.sentinel_id(0)] + b + [tok.sentinel_id(99), tok.eos_id, tok.pad_id]
    gap = "" if kind == "bytes" else " "  # SentencePiece-style: "again" is "▁again"
    assert tok.decode(ids) == f"hello world<extra_id_0>{gap}again<extra_id_99></s><pad>"
    assert tok.decode(np.asarray(ids), show_special=False) == (
        f"hello world<extra_id_0>{gap}again<extra_id_99>"
    )
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("kind", ["bytes", "sp", "hf", "hf_t5"])
def test_encode_keeps_special_strings_as_text(kind, tokenizers_by_kind):
    tok = tokenizers_by_kind[kind]
    ids = np.asarray(tok.encode("end </s> pad <pad> <extra_id_0> <extra_id_99>"))
    assert ids.size > 0
    assert not np.isin(ids, [tok.eos_id, tok.pad_id]).any()
    assert not tok.is_sentinel(ids).any()


def test_load_tokenizer_dispatch(tmp_path, sp_model, hf_paths):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    sp = load_tokenizer(sp_model)
    assert isinstance(sp, SentencePieceTokenizer) and sp.spec == sp_model
    assert isinstance(load_tokenizer(hf_paths["t5"]), HFTokenizer)
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    shutil.copy(hf_paths["t5"], t5_dir / "tokenizer.json")
    assert isinstance(load_tokenizer(str(t5_dir)), HFTokenizer)
    shutil.copy(sp_model, t5_dir / "spiece.model")  # spiece.model wins over tokenizer.json
    from_dir = load_tokenizer(str(t5_dir))
    assert isinstance(from_dir, SentencePieceTokenizer)
    assert from_dir.encode("a set is finite") == sp.encode("a set is finite")


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "spiece.model")
    with pytest.raises(DataError, match="nowhere") as e:
        load_tokenizer(missing)
    assert "train-tokenizer" in str(e.value)
    with pytest.raises(DataError, match="'bytes'") as e:
        load_tokenizer(str(tmp_path / "vocab.txt"))
    assert "vocab.txt" in str(e.value)
    with pytest.raises(DataError, match="holds none of"):
        load_tokenizer(str(tmp_path))
    garbage = tmp_path / "broken.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(DataError, match="broken.model"):
        load_tokenizer(str(garbage))


def test_sentencepiece_with_sentinels_at_wrong_ids_is_rejected(corpus, tmp_path):
    # user_defined_symbols are placed right after the special pieces: ids 3..102
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences(corpus[1][:100], 4192)),
        model_prefix=str(tmp_path / "bad"),
        vocab_size=600,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        byte_fallback=True,
        user_defined_symbols=SENTINELS,
        minloglevel=2,
    )
    path = str(tmp_path / "bad.model")
    assert spm.SentencePieceProcessor(model_file=path).piece_to_id("<extra_id_0>") == 3
    with pytest.raises(DataError, match="bad.model") as e:
        SentencePieceTokenizer(path)
    assert "<extra_id_0> has id 3" in str(e.value)


def test_sentencepiece_with_sentinels_on_top_is_accepted(sp_model, tmp_path):
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = model_pb2.ModelProto()
    with open(sp_model, "rb") as f:
        proto.ParseFromString(f.read())
    n = len(proto.pieces)
    for piece in SENTINELS[::-1]:
        proto.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.CONTROL)
    path = tmp_path / "t5.model"
    path.write_bytes(proto.SerializeToString())
    tok = SentencePieceTokenizer(str(path))
    assert tok.vocab_size == n + 100
    raw = spm.SentencePieceProcessor(model_file=str(path))
    assert [tok.sentinel_id(k) for k in range(100)] == [raw.piece_to_id(s) for s in SENTINELS]
    # a model with only some sentinels is an error
    del proto.pieces[-1]
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(DataError, match="99 of the 100"):
        SentencePieceTokenizer(str(path))


def test_train_sentencepiece_gives_t5_layout(sp_model):
    raw = spm.SentencePieceProcessor(model_file=sp_model)
    assert raw.get_piece_size() == 900
    assert (raw.pad_id(), raw.eos_id(), raw.unk_id(), raw.bos_id()) == (0, 1, 2, -1)
    tok = load_tokenizer(sp_model)
    assert tok.vocab_size == 1000
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    # byte fallback: characters never seen in training still encode without <unk>
    ids = tok.encode("🚀 東京")
    assert 2 not in ids and tok.decode(ids) == "🚀 東京"
    assert os.path.isfile(sp_model[: -len(".model")] + ".vocab")
    assert sorted(os.listdir(os.path.dirname(sp_model))) == ["sp.model", "sp.vocab"]


def test_train_sentencepiece_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError) as e:  # our error itself, not sentencepiece's wrapper of it
        train_sentencepiece([str(bad)], str(tmp_path / "out"), progress=False)
    assert str(e.value).startswith(f"{bad}:2: not valid JSON")
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError) as e:
        train_sentencepiece([str(bad)], str(tmp_path / "out"), progress=False)
    assert str(e.value).startswith(f"{bad}:2: no string field 'text'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no text"):
        train_sentencepiece([str(empty)], str(tmp_path / "out"), progress=False)
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "a tiny corpus"}\n')
    with pytest.raises(DataError, match="smaller vocab_size"):
        train_sentencepiece([str(small)], str(tmp_path / "out"), vocab_size=8000, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.jsonl", "small.jsonl"]


def test_training_sentences_cut_long_lines():
    words = [f"w{i}" * (1 + i % 7) for i in range(500)]
    doc = " ".join(words) + "\n\n  second line  \n" + "x" * 130
    pieces = list(training_sentences([doc], max_sentence_bytes=40))
    assert all(0 < len(p.encode()) <= 40 for p in pieces)
    assert " ".join(pieces).split() == words + ["second", "line"] + ["x" * 10] * 13


def test_hf_special_token_detection(hf_paths):
    gpt = HFTokenizer(hf_paths["gpt"])
    raw = RawHF.from_file(hf_paths["gpt"])
    assert gpt.eos_id == gpt.pad_id == raw.token_to_id("<|endoftext|>")
    assert gpt.unk_id is None
    plain = load_tokenizer(hf_paths["plain"] + "?eos=%3Cunk%3E")
    assert plain.eos_id == RawHF.from_file(hf_paths["plain"]).token_to_id("<unk>")
    assert plain.pad_id == RawHF.from_file(hf_paths["plain"]).token_to_id("<pad>")
    with pytest.raises(DataError, match="not in its vocabulary"):
        HFTokenizer(hf_paths["plain"], eos_token="<nope>")
    with pytest.raises(DataError, match="unknown options"):
        load_tokenizer(hf_paths["plain"] + "?bos=x")


def test_hf_sentinels_in_wrong_order_are_rejected(hf_paths):
    with pytest.raises(DataError, match="wrong") as e:  # the directory is named "wrong"
        HFTokenizer(hf_paths["wrong"])
    assert "<extra_id_0>" in str(e.value)


@pytest.mark.parametrize("kind", ["bytes", "sp", "hf", "hf_t5"])
def test_pickle_sends_only_the_spec(kind, tokenizers_by_kind, corpus):
    tok = tokenizers_by_kind[kind]
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # the spec, not the model
    back = pickle.loads(blob)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    assert back.fingerprint() == tok.fingerprint()
    text = corpus[1][7]
    assert back.encode(text) == tok.encode(text)
    assert load_tokenizer(tok.spec).encode(text) == tok.encode(text)


def test_pickle_keeps_hf_options(hf_paths):
    tok = HFTokenizer(hf_paths["plain"], eos_token="<unk>")
    back = pickle.loads(pickle.dumps(tok))
    assert back.eos_id == tok.eos_id != HFTokenizer(hf_paths["plain"]).eos_id
    assert back.fingerprint() == tok.fingerprint() != HFTokenizer(hf_paths["plain"]).fingerprint()


def test_fingerprint_follows_the_file_content(corpus, sp_model, hf_paths, tmp_path):
    copy = tmp_path / "copy.model"
    shutil.copy(sp_model, copy)
    original = SentencePieceTokenizer(sp_model).fingerprint()
    assert SentencePieceTokenizer(str(copy)).fingerprint() == original
    train_sentencepiece([corpus[0]], str(tmp_path / "copy"), vocab_size=800, progress=False)
    assert SentencePieceTokenizer(str(copy)).fingerprint() != original

    hf_copy = tmp_path / "tokenizer.json"
    shutil.copy(hf_paths["plain"], hf_copy)
    before = HFTokenizer(str(hf_copy)).fingerprint()
    raw = RawHF.from_file(str(hf_copy))
    raw.add_tokens(["brandnewtoken"])
    raw.save(str(hf_copy))
    assert HFTokenizer(str(hf_copy)).fingerprint() != before
    fingerprints = {ByteTokenizer().fingerprint(), original, before}
    assert len(fingerprints) == 3 and all(len(f) == 16 for f in fingerprints)
