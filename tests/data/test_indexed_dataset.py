"""The .bin/.idx dataset: Megatron interop both ways, random reads, merge, and corrupt files."""

from __future__ import annotations

import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from megarch.data.errors import DataError
from megarch.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    dataset_exists,
    merge_datasets,
)

DTYPES = [np.uint16, np.int32]


def random_docs(seed: int, n_docs: int = 60, high: int = 60000) -> list[np.ndarray]:
    """Documents of random ids and lengths 0..80 (some empty)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, int(rng.integers(0, 80))) for _ in range(n_docs)]


def write(prefix: str, docs: list[np.ndarray], dtype: type) -> str:
    """Half the documents one by one, the rest through the bulk path."""
    half = len(docs) // 2
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs[:half]:
            writer.add_document(doc)
        rest = docs[half:]
        writer.add_array(np.concatenate([np.zeros(0, int), *rest]), [len(d) for d in rest])
    return prefix


def file_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's indexed_dataset module (its import warns about apex / TE: silenced).
    megatron-core is the ``megatron`` extra (CI installs it); without it these tests skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(
            "megatron.core.datasets.indexed_dataset",
            reason="megatron-core is not installed: pip install -e '.[megatron]'",
        )


def megatron_build(megatron, prefix: str, docs: list[list[np.ndarray]], dtype: type) -> str:
    """Build with megatron-core: each document is a list of sequences."""
    import torch

    builder = megatron.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for sequences in docs:
        for seq in sequences:
            builder.add_item(torch.from_numpy(np.asarray(seq, dtype=np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_reads_match_the_source(tmp_path, dtype):
    docs = random_docs(0)
    ds = IndexedDataset(write(str(tmp_path / "d"), docs, dtype))
    assert ds.dtype == np.dtype(dtype) and len(ds) == ds.num_documents == len(docs)
    np.testing.assert_array_equal(ds.document_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    offsets = ds.document_token_offsets
    rng = np.random.default_rng(1)
    for i in rng.integers(0, len(docs), 200):
        np.testing.assert_array_equal(ds.document(i), docs[i])
        np.testing.assert_array_equal(ds.tokens[offsets[i] : offsets[i + 1]], docs[i])
        offset = int(rng.integers(0, len(docs[i]) + 1))
        length = int(rng.integers(0, len(docs[i]) - offset + 1))
        np.testing.assert_array_equal(ds.get(i, offset, length), docs[i][offset : offset + length])
        np.testing.assert_array_equal(ds.get(i, offset), docs[i][offset:])
    np.testing.assert_array_equal(ds.document(-1), docs[-1])
    with pytest.raises(IndexError):
        ds.get(len(docs))
    with pytest.raises(IndexError):
        ds.get(0, 0, len(docs[0]) + 1)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds)).document(3), docs[3])


def test_multi_sequence_documents(tmp_path):
    docs = [[np.arange(3), np.arange(5, 7)], [np.arange(4)], [np.arange(2), np.arange(0), [9]]]
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        for sequences in docs:
            writer.add_document_sequences(sequences)
    ds = IndexedDataset(str(tmp_path / "d"))
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3, 6])
    np.testing.assert_array_equal(ds.sequence_lengths, [3, 2, 4, 2, 0, 1])
    np.testing.assert_array_equal(ds.document_lengths, [5, 4, 3])
    np.testing.assert_array_equal(ds.document(0), [0, 1, 2, 5, 6])
    np.testing.assert_array_equal(ds.get(3), [0, 1])
    np.testing.assert_array_equal(ds.document(2), [0, 1, 9])


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16):
        pass
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 0 and ds.num_documents == 0 and ds.tokens.size == 0
    assert ds.document_token_offsets.tolist() == [0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bytes_as_megatron_and_both_read_each_other(tmp_path, megatron, dtype):
    docs = random_docs(2)
    theirs = megatron_build(megatron, str(tmp_path / "theirs"), [[d] for d in docs], dtype)
    ours = write(str(tmp_path / "ours"), docs, dtype)
    assert file_bytes(ours) == file_bytes(theirs)

    read_by_us = IndexedDataset(theirs)
    read_by_them = megatron.IndexedDataset(ours)
    assert len(read_by_them) == len(docs)
    np.testing.assert_array_equal(read_by_them.document_indices, read_by_us.document_indices)
    np.testing.assert_array_equal(read_by_them.sequence_lengths, read_by_us.sequence_lengths)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(read_by_us.document(i), doc)
        np.testing.assert_array_equal(read_by_them[i], doc)
        assert read_by_them[i].dtype == np.dtype(dtype)
    k = int(np.argmax([len(d) for d in docs]))
    np.testing.assert_array_equal(read_by_them.get(k, 3, 7), read_by_us.get(k, 3, 7))


def test_multi_sequence_documents_same_bytes_as_megatron(tmp_path, megatron):
    rng = np.random.default_rng(3)
    docs = [
        [rng.integers(0, 999, int(rng.integers(0, 9))) for _ in range(rng.integers(1, 4))]
        for _ in range(30)
    ]
    theirs = megatron_build(megatron, str(tmp_path / "theirs"), docs, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16) as writer:
        for sequences in docs:
            writer.add_document_sequences(sequences)
    assert file_bytes(str(tmp_path / "ours")) == file_bytes(theirs)
    ds = IndexedDataset(theirs)
    for i, sequences in enumerate(docs):
        np.testing.assert_array_equal(ds.document(i), np.concatenate(sequences))


def test_merge_equals_a_direct_build_and_megatron_merge(tmp_path, megatron):
    parts = [random_docs(4, 20), random_docs(5, 0), random_docs(6, 35)]
    prefixes = [write(str(tmp_path / f"part{i}"), docs, np.uint16) for i, docs in enumerate(parts)]
    merged = merge_datasets(prefixes, str(tmp_path / "merged"))
    everything = [d for docs in parts for d in docs]
    direct = write(str(tmp_path / "direct"), everything, np.uint16)
    assert file_bytes(str(tmp_path / "merged")) == file_bytes(direct)
    assert merged.num_documents == len(everything)

    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "theirs.idx"))
    assert file_bytes(str(tmp_path / "merged")) == file_bytes(str(tmp_path / "theirs"))


def test_merge_refuses_mixed_dtypes(tmp_path):
    a = write(str(tmp_path / "a"), random_docs(7, 5), np.uint16)
    b = write(str(tmp_path / "b"), random_docs(8, 5), np.int32)
    with pytest.raises(DataError, match=r"(?s)b .*int32.*a .*uint16"):
        merge_datasets([a, b], str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]


def test_best_dtype():
    assert best_dtype(359) == np.uint16 and best_dtype(2**16) == np.uint16
    assert best_dtype(2**16 + 1) == np.int32 and best_dtype(250_000) == np.int32


@pytest.mark.parametrize(
    ("dtype", "bad_id"), [(np.uint16, 65536), (np.uint16, -1), (np.int32, 2**31), (np.uint8, 256)]
)
def test_token_overflow_names_prefix_id_and_fix(tmp_path, dtype, bad_id):
    prefix = str(tmp_path / "d")
    with pytest.raises(DataError) as info, IndexedDatasetWriter(prefix, dtype) as writer:
        writer.add_document(np.array([5, 7]))
        writer.add_array(np.array([1, bad_id, 2], dtype=np.int64), [1, 2])
    message = str(info.value)
    assert prefix in message and str(bad_id) in message and "wider dtype" in message
    assert os.listdir(tmp_path) == []  # aborted: no temporary files either


def test_nothing_published_until_finalized(tmp_path):
    prefix = str(tmp_path / "d")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([1, 2, 3])
    assert not dataset_exists(prefix)
    writer.finalize(publish=False)
    assert not dataset_exists(prefix) and len(os.listdir(tmp_path)) == 2
    writer.publish()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert IndexedDataset(prefix).document(0).tolist() == [1, 2, 3]

    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([4, 5])
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]  # the old dataset is untouched
    assert IndexedDataset(prefix).document(0).tolist() == [1, 2, 3]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path: str, n_bytes: int) -> None:
    os.truncate(path, os.path.getsize(path) - n_bytes)


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# The test dataset: 3 documents of lengths 4, 0, 2 (uint16): S = 3 sequences, D + 1 = 4.
# .idx offsets: header 34, lengths 34..46, pointers 46..70, document indices 70..102.
CORRUPTIONS = {
    "missing idx": (lambda p: os.remove(p + ".idx"), ".idx", "not found.*re-run preprocessing"),
    "missing bin": (lambda p: os.remove(p + ".bin"), ".bin", "not found.*re-run preprocessing"),
    "idx truncated": (lambda p: _truncate(p + ".idx", 8), ".idx", "truncated"),
    "idx header truncated": (lambda p: _truncate(p + ".idx", 90), ".idx", "truncated"),
    "idx trailing bytes": (lambda p: _append(p + ".idx", b"\0"), ".idx", "trailing bytes"),
    "bad magic": (lambda p: _patch(p + ".idx", 0, b"XX"), ".idx", "bad magic"),
    "bad version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), ".idx", "version 2"),
    "bad dtype code": (lambda p: _patch(p + ".idx", 17, b"\x63"), ".idx", "dtype code 99"),
    "bin truncated": (lambda p: _truncate(p + ".bin", 2), ".bin", "truncated.*re-run"),
    "bin trailing bytes": (lambda p: _append(p + ".bin", b"\0\0"), ".bin", "trailing bytes"),
    "pointer wrong": (lambda p: _patch(p + ".idx", 54, struct.pack("<q", 6)), ".idx", "sequence 1"),
    "length negative": (
        lambda p: _patch(p + ".idx", 38, struct.pack("<i", -1)),
        ".idx",
        "negative",
    ),
    "doc index not 0": (
        lambda p: _patch(p + ".idx", 70, struct.pack("<q", 1)),
        ".idx",
        "start at 1 instead",
    ),
    "doc index end": (
        lambda p: _patch(p + ".idx", 94, struct.pack("<q", 2)),
        ".idx",
        "end at 2 instead",
    ),
    "doc index order": (
        lambda p: _patch(p + ".idx", 78, struct.pack("<q", 3)),
        ".idx",
        "decrease at document 1",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_are_refused_with_file_and_fix(tmp_path, case):
    corrupt, suffix, pattern = CORRUPTIONS[case]
    prefix = write(
        str(tmp_path / "d"),
        [np.array([1, 2, 3, 4]), np.array([], int), np.array([5, 6])],
        np.uint16,
    )
    IndexedDataset(prefix)  # intact: opens
    corrupt(prefix)
    with pytest.raises(DataError, match=pattern) as info:
        IndexedDataset(prefix)
    assert f"{prefix}{suffix}" in str(info.value)
