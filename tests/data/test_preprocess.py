"""jsonl -> .bin/.idx preprocessing, checked against tokenizing the same lines directly."""

from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np
import pytest

from megarch.data import preprocess as preprocess_module
from megarch.data.errors import DataError
from megarch.data.indexed_dataset import IndexedDataset
from megarch.data.preprocess import preprocess
from megarch.data.tokenizers import load_tokenizer, train_sentencepiece


def random_texts(seed: int, n: int) -> list[str]:
    """Texts of pseudo-words, some with non-ASCII characters, of varied lengths."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["é", "ß", "中", "🙂"]
    words = ["".join(rng.choice(letters, int(rng.integers(1, 8)))) for _ in range(300)]
    return [" ".join(rng.choice(words, int(rng.integers(1, 60)))) for _ in range(n)]


def write_jsonl(path, records: list, opener=open) -> str:
    """One line per record: dicts as JSON, strings and bytes verbatim."""
    with opener(path, "wb") as f:
        for record in records:
            if isinstance(record, dict):
                record = json.dumps(record, ensure_ascii=False)
            f.write(record if isinstance(record, bytes) else record.encode("utf-8"))
            f.write(b"\n")
    return str(path)


def documents(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds.document(i).tolist() for i in range(ds.num_documents)]


def expected_documents(spec: str, texts: list[str], eos: bool = True) -> list[list[int]]:
    """The reference: the tokenizer applied to each text directly."""
    tok = load_tokenizer(spec)
    return [tok.encode(t) + ([tok.eos_id] if eos else []) for t in texts]


def file_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A small SentencePiece model (500 ids with the sentinels) trained on random texts."""
    root = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in random_texts(0, 400)])
    return train_sentencepiece(
        [corpus], str(root / "sp"), vocab_size=500, progress=False, num_threads=1
    )


def test_output_equals_tokenizing_the_lines_directly(tmp_path, sp_model):
    texts = random_texts(1, 50)
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    records[3] = {"text": "  \t "}  # empty after strip: skipped, not an error
    records[7] = "   "  # blank line
    path = write_jsonl(tmp_path / "in.jsonl", records)
    with open(path, "r+b") as f:  # a byte-order mark and a CRLF line end must not matter
        body = f.read()
        f.seek(0)
        f.write(b"\xef\xbb\xbf" + body.replace(b"\n", b"\r\n", 1))
    kept = [t for i, t in enumerate(texts) if i not in (3, 7)]
    summary = preprocess([path], str(tmp_path / "out"), sp_model, progress=False)
    assert documents(str(tmp_path / "out_text_document")) == expected_documents(sp_model, kept)
    assert IndexedDataset(str(tmp_path / "out_text_document")).dtype == np.uint16
    assert summary.lines == 50 and summary.docs == 48
    assert summary.skipped == {"empty": 1, "blank_line": 1}
    assert summary.tokens == {"text": sum(map(len, expected_documents(sp_model, kept)))}
    assert summary.outputs == {"text": str(tmp_path / "out_text_document")}
    text = summary.format()
    assert "48 documents" in text and "1 empty text" in text and "out_text_document" in text


def test_no_eos_and_explicit_dtype(tmp_path):
    texts = random_texts(2, 10)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    preprocess(
        path, str(tmp_path / "out"), "bytes", append_eos=False, dtype="int32", progress=False
    )
    prefix = str(tmp_path / "out_text_document")
    assert documents(prefix) == expected_documents("bytes", texts, eos=False)
    assert IndexedDataset(prefix).dtype == np.int32


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_1_and_2_give_identical_output(tmp_path, sp_model, monkeypatch, start_method):
    """Many small chunks over two files (lines longer than a chunk too), bad lines skipped."""
    monkeypatch.setattr(preprocess_module, "pool_start_method", lambda: start_method)
    texts = random_texts(3, 120)
    records: list = [{"text": t} for t in texts]
    records[10] = "{not json"
    records[50] = {"body": "no text key"}
    first = write_jsonl(tmp_path / "a.jsonl", records[:70])
    second = write_jsonl(tmp_path / "b.jsonl", records[70:])
    runs = {}
    for workers in (1, 2):
        runs[workers] = preprocess(
            [first, second],
            str(tmp_path / f"w{workers}"),
            sp_model,
            workers=workers,
            skip_bad_lines=True,
            chunk_size=300,
            progress=False,
        )
    assert file_bytes(str(tmp_path / "w1_text_document")) == file_bytes(
        str(tmp_path / "w2_text_document")
    )
    kept = [t for i, t in enumerate(texts) if i not in (10, 50)]
    assert documents(str(tmp_path / "w2_text_document")) == expected_documents(sp_model, kept)
    for field in ("lines", "docs", "tokens", "skipped", "skipped_examples"):
        assert getattr(runs[1], field) == getattr(runs[2], field)
    assert runs[2].skipped_examples == [f"{first}:11 (malformed JSON)", f"{first}:51 (missing key)"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_chunk_boundaries_change_nothing(tmp_path, suffix):
    """Chunks of 1 byte to the whole file: same output, same line numbers in the summary."""
    texts = random_texts(11, 40)
    records: list = [{"text": t} for t in texts]
    records[5], records[17], records[39] = "", "{bad", '{"x": 1}'
    raw = b"\xef\xbb\xbf" + b"\n".join(
        (json.dumps(r) if isinstance(r, dict) else r).encode() for r in records
    )  # a byte-order mark, and no newline at the end
    path = str(tmp_path / f"in{suffix}")
    with (gzip.open if suffix.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)
    runs = []
    for chunk_size in (1, 7, 300, 10**6):
        prefix = str(tmp_path / f"c{chunk_size}")
        runs.append(preprocess([path], prefix, "bytes", skip_bad_lines=True,
                               chunk_size=chunk_size, progress=False))
        assert file_bytes(prefix + "_text_document") == file_bytes(runs[0].outputs["text"])
    kept = [t for i, t in enumerate(texts) if i not in (5, 17, 39)]
    assert documents(runs[0].outputs["text"]) == expected_documents("bytes", kept)
    for run in runs:
        assert (run.lines, run.docs) == (40, 37)
        assert run.skipped_examples == [f"{path}:18 (malformed JSON)", f"{path}:40 (missing key)"]


def test_first_bad_line_stops_the_run_with_workers(tmp_path):
    records: list = [{"text": t} for t in random_texts(4, 80)]
    records[55] = "[1, 2]"
    records[66] = "{oops"
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=rf"{re.escape(path)}:56: a JSON array, not an object"):
        preprocess([path], str(out / "d"), "bytes", workers=2, chunk_size=200, progress=False)
    assert os.listdir(out) == []


def test_prompted_inputs_and_targets_stay_aligned(tmp_path):
    inputs, targets = random_texts(5, 30), random_texts(6, 30)
    records: list = [{"inputs": i, "targets": t} for i, t in zip(inputs, targets, strict=True)]
    records[4] = {"inputs": inputs[4], "targets": ""}  # empty target: the whole line goes
    records[9] = {"inputs": inputs[9]}  # missing target
    records[12] = {"inputs": 5, "targets": targets[12]}  # non-string input
    path = write_jsonl(tmp_path / "in.jsonl", records)
    summary = preprocess(
        [path],
        str(tmp_path / "p"),
        "bytes",
        json_keys=("inputs", "targets"),
        skip_bad_lines=True,
        progress=False,
    )
    keep = [i for i in range(30) if i not in (4, 9, 12)]
    got_inputs = documents(str(tmp_path / "p_inputs_document"))
    got_targets = documents(str(tmp_path / "p_targets_document"))
    assert got_inputs == expected_documents("bytes", [inputs[i] for i in keep])
    assert got_targets == expected_documents("bytes", [targets[i] for i in keep])
    assert summary.skipped == {"empty": 1, "missing_key": 1, "not_string": 1}
    assert set(summary.tokens) == {"inputs", "targets"} and summary.docs == 27


def test_gzip_and_glob_inputs(tmp_path):
    texts = random_texts(7, 40)
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "part-1.jsonl", [{"text": t} for t in texts[20:]])
    write_jsonl(
        tmp_path / "shards" / "part-0.jsonl.gz", [{"text": t} for t in texts[:20]], opener=gzip.open
    )
    write_jsonl(tmp_path / "shards" / "notes.txt", ["not data"])
    summary = preprocess(
        [str(tmp_path / "shards" / "part-*.jsonl*")], str(tmp_path / "g"), "bytes", progress=False
    )
    assert [os.path.basename(f) for f in summary.files] == ["part-0.jsonl.gz", "part-1.jsonl"]
    assert documents(str(tmp_path / "g_text_document")) == expected_documents("bytes", texts)


def test_glob_matching_nothing_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing\*\.jsonl: no file matches"):
        preprocess([str(tmp_path / "nothing*.jsonl")], str(tmp_path / "o"), "bytes")
    with pytest.raises(DataError, match=r"absent\.jsonl: file not found"):
        preprocess([str(tmp_path / "absent.jsonl")], str(tmp_path / "o"), "bytes")


BAD_LINES = {
    "malformed json": ('{"text": "a', r"not valid JSON \(Unterminated string"),
    "not an object": ('"just a string"', r"a JSON string, not an object"),
    "missing key": ('{"body": "x"}', r"no field 'text' \(fields: 'body'\); choose the fields"),
    "non-string": ('{"text": ["a"]}', r"field 'text' is a JSON array, not a string"),
    "invalid utf-8": (b'{"text": "caf\xe9"}', r"not valid UTF-8 \(byte 0xe9 at byte 13\)"),
    "unencodable": ('{"text": "lone \\ud800 surrogate"}', r"the tokenizer failed on it"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_names_file_line_and_fix_and_publishes_nothing(tmp_path, case):
    bad, pattern = BAD_LINES[case]
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "also fine"}, bad])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"{re.escape(path)}:3: {pattern}.*--skip-bad-lines"):
        preprocess([path], str(out / "d"), "bytes", progress=False)
    assert os.listdir(out) == []


def test_skip_bad_lines_counts_each_reason(tmp_path):
    good = random_texts(8, 6)
    lines = (
        [{"text": good[0]}]
        + [bad for bad, _ in BAD_LINES.values()]
        + [{"text": t} for t in good[1:]]
        + ["", {"text": ""}, "[]"]
    )
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    summary = preprocess([path], str(tmp_path / "s"), "bytes", skip_bad_lines=True, progress=False)
    assert documents(str(tmp_path / "s_text_document")) == expected_documents("bytes", good)
    assert summary.skipped == {
        "malformed_json": 1,
        "not_object": 2,
        "missing_key": 1,
        "not_string": 1,
        "invalid_utf8": 1,
        "unencodable": 1,
        "blank_line": 1,
        "empty": 1,
    }
    assert summary.lines == len(lines) and summary.docs == 6
    assert summary.skipped_examples == [
        f"{path}:2 (malformed JSON)",
        f"{path}:3 (not a JSON object)",
        f"{path}:4 (missing key)",
        f"{path}:5 (non-string value)",
        f"{path}:6 (invalid UTF-8)",
    ]
    assert "2 not a JSON object" in summary.format()


def test_empty_file_and_corrupt_gzip(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "x"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: the file is empty"):
        preprocess([good, str(empty)], str(tmp_path / "e"), "bytes", progress=False)
    summary = preprocess(
        [good, str(empty)], str(tmp_path / "e"), "bytes", skip_bad_lines=True, progress=False
    )
    assert summary.skipped == {"empty_file": 1} and summary.docs == 1

    empty_gz = tmp_path / "empty.jsonl.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=rf"{re.escape(str(empty_gz))}: the file is empty"):
        preprocess([good, str(empty_gz)], str(tmp_path / "e"), "bytes", progress=False)

    not_gzip = tmp_path / "bad.jsonl.gz"
    not_gzip.write_bytes(b'{"text": "plain text with a .gz name"}\n')
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "abc"}\n' * 1000)[:-40])
    for path in (not_gzip, truncated):
        with pytest.raises(
            DataError, match=rf"{re.escape(str(path))}: a corrupt or truncated gzip file"
        ):
            preprocess(
                [good, str(path)], str(tmp_path / "z"), "bytes", skip_bad_lines=True, progress=False
            )
    assert not any(name.startswith("z") for name in os.listdir(tmp_path))


def test_every_line_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": " "}, {"other": "x"}])
    with pytest.raises(DataError, match=r"no documents.*1 empty text, 1 missing key"):
        preprocess([path], str(tmp_path / "o"), "bytes", skip_bad_lines=True, progress=False)


def test_token_ids_that_overflow_the_dtype(tmp_path):
    # Byte ids are byte + 3: ASCII fits int8 (max 127), "é" (0xC3 0xA9) does not.
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "plain"}, {"text": "ok"}, {"text": "é"}])
    out = tmp_path / "out"
    with pytest.raises(
        DataError, match=rf"{re.escape(path)}:3: field 'text': token id 198 .*wider dtype"
    ):
        preprocess([path], str(out / "d"), "bytes", dtype=np.int8, progress=False)
    assert os.listdir(out) == []


def test_failure_midway_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in random_texts(9, 60)])
    out = tmp_path / "out"
    preprocess([path], str(out / "d"), "bytes", json_keys=("text",), progress=False)
    before = file_bytes(str(out / "d_text_document"))

    calls = {"n": 0}
    real_add = preprocess_module._Collector.add

    def add_then_crash(self, task, result):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C after some chunks were written
        return real_add(self, task, result)

    monkeypatch.setattr(preprocess_module._Collector, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess([path], str(out / "d"), "bytes", chunk_size=500, progress=False)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        preprocess([path], str(out / "new"), "bytes", chunk_size=500, progress=False)
    assert sorted(os.listdir(out)) == ["d_text_document.bin", "d_text_document.idx"]
    assert file_bytes(str(out / "d_text_document")) == before


def test_progress_bar_shows_docs_and_tokens_per_second(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in random_texts(10, 20)])
    preprocess([path], str(tmp_path / "o"), "bytes", progress=True)
    err = capsys.readouterr().err
    assert "doc" in err and "tok/s" in err and "20" in err
    preprocess([path], str(tmp_path / "q"), "bytes", progress=False)
    assert capsys.readouterr().err == ""
