"""The embedded stdlib-docstring corpus: content, filters, determinism, atomic output."""

from __future__ import annotations

import collections
import inspect
import json
import os
import re

import pytest

from megarch.data import corpus as corpus_mod
from megarch.data.corpus import build_stdlib_corpus, is_prose, module_name
from megarch.data.errors import DataError

LONG = "This sentence is plain English prose about the library and its use. " * 4  # 272 chars


def _read(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("stdlib") / "stdlib.jsonl"
    summary = build_stdlib_corpus(str(path), progress=False)
    return path, summary, _read(path)


def test_full_corpus_content(full_corpus):
    path, summary, records = full_corpus
    assert summary["docs"] == len(records) > 1000
    assert summary["chars"] == sum(len(r["text"]) for r in records) > 1_000_000
    assert summary["files"] > 300
    by_source = {r["source"]: r["text"] for r in records}
    assert len(by_source) == len(records)
    import json as json_module  # the reference: the docstring Python itself reports

    assert by_source["json"] == inspect.cleandoc(json_module.__doc__)
    assert by_source["collections.Counter"] == inspect.cleandoc(collections.Counter.__doc__)
    for r in records:
        assert isinstance(r["text"], str) and len(r["text"]) >= 200
        assert r["text"] == r["text"].strip()
    words = collections.Counter(
        w for r in records[::10] for w in re.findall(r"[a-z]+", r["text"].lower())
    )
    assert words.most_common(1)[0][0] == "the"  # English prose, not code


def test_skipped_packages_are_absent(full_corpus):
    sources = [r["source"] for r in full_corpus[2]]
    for pkg in ("test", "idlelib", "lib2to3", "tkinter", "turtledemo"):
        assert not any(s == pkg or s.startswith(pkg + ".") for s in sources), pkg
    assert not any(".test." in s or ".tests." in s for s in sources)
    assert any(s.startswith("pydoc_data.topics[") for s in sources)


def test_build_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sa = build_stdlib_corpus(str(a), max_docs=300, progress=False)
    sb = build_stdlib_corpus(str(b), max_docs=300, progress=False)
    assert sa == sb and sa["docs"] == 300
    assert a.read_bytes() == b.read_bytes()
    assert len(a.read_bytes().splitlines()) == 300


def _fake_stdlib(root) -> None:
    files = {
        "zeta.py": f'"""{LONG}zeta"""\n',
        "alpha.py": (
            f'"""{LONG}module"""\n'
            f"class Thing:\n"
            f'    """{LONG}class"""\n'
            f"    def method(self):\n"
            f'        """short"""\n'
            f"    if True:\n"
            f"        async def inner(self):\n"
            f'            """{LONG}nested"""\n'
            f"def numbers():\n"
            f'    """{"0x12, 0x34, 0x56, 0x78; " * 20}"""\n'
            f"def duplicate():\n"
            f'    """{LONG}module"""\n'
        ),
        "pkg/__init__.py": f'"""{LONG}package"""\n',
        "pkg/test/test_x.py": f'"""{LONG}"""\n',
        "tkinter/__init__.py": f'"""{LONG}"""\n',
        "site-packages/other.py": f'"""{LONG}"""\n',
        "broken.py": f'"""{LONG}"""\ndef (:\n',
        "pydoc_data/topics.py": f"topics = {{'assert': {LONG!r}, 'tiny': 'x'}}\n",
    }
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_walk_order_filters_and_names(tmp_path):
    root = tmp_path / "lib"
    _fake_stdlib(str(root))
    out = tmp_path / "out.jsonl"
    summary = build_stdlib_corpus(str(out), root=str(root), progress=False)
    records = _read(out)
    assert [r["source"] for r in records] == [
        "alpha",
        "alpha.Thing",
        "alpha.Thing.inner",
        "pkg",
        "pydoc_data.topics[assert]",
        "zeta",
    ]
    assert records[2]["text"] == LONG + "nested"
    assert summary == {"docs": 6, "chars": sum(len(r["text"]) for r in records), "files": 5}


def test_max_docs_and_errors(tmp_path):
    root = tmp_path / "lib"
    _fake_stdlib(str(root))
    out = tmp_path / "out.jsonl"
    assert build_stdlib_corpus(str(out), max_docs=2, root=str(root), progress=False)["docs"] == 2
    assert [r["source"] for r in _read(out)] == ["alpha", "alpha.Thing"]
    with pytest.raises(DataError, match="no documents"):
        build_stdlib_corpus(str(tmp_path / "none.jsonl"), min_chars=10**6, root=str(root))
    with pytest.raises(DataError, match="does not exist"):
        build_stdlib_corpus(str(tmp_path / "none.jsonl"), root=str(tmp_path / "missing"))
    assert sorted(os.listdir(tmp_path)) == ["lib", "out.jsonl"]


def test_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "corpus.jsonl"
    real = corpus_mod.file_texts
    calls = []

    def failing(root, rel_path):
        calls.append(rel_path)
        if len(calls) == 40:
            raise OSError("disk on fire")
        return real(root, rel_path)

    monkeypatch.setattr(corpus_mod, "file_texts", failing)
    with pytest.raises(OSError, match="disk on fire"):
        build_stdlib_corpus(str(out), progress=False)
    assert os.listdir(tmp_path) == []
    out.write_text("previous complete corpus\n")
    calls.clear()
    with pytest.raises(OSError):
        build_stdlib_corpus(str(out), progress=False)
    assert os.listdir(tmp_path) == ["corpus.jsonl"]
    assert out.read_text() == "previous complete corpus\n"


def test_helpers():
    assert module_name("json/__init__.py") == "json"
    assert module_name("email/mime/text.py") == "email.mime.text"
    assert module_name("os.py") == "os"
    assert is_prose(LONG, 200)
    assert not is_prose(LONG, 300)
    assert not is_prose("0x00 0x01 0x02 0x03 " * 20, 50)
    # exactly at the threshold: 7 letters/spaces of 10 characters
    assert is_prose("abcdefg123", 10) and not is_prose("abcdef1234", 10)
