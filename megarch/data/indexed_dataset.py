"""Megatron's memory-mapped ``.bin``/``.idx`` token dataset: writer, reader and merge.

The files are byte-for-byte those of megatron-core's ``IndexedDatasetBuilder`` (version 1), so
datasets move freely between megarch and Megatron-LM. ``prefix.bin`` holds the token ids of
every sequence back to back; ``prefix.idx`` holds, little-endian:

=========================  ==========================================================
``MMIDIDX\\x00\\x00``       9-byte magic
``<Q`` version             always 1
``<B`` dtype code          1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                           7 float32, 8 uint16
``<Q`` sequence count      S
``<Q`` document count      D + 1 (the length of the document-index array)
int32[S]                   tokens per sequence
int64[S]                   byte offset of each sequence in ``.bin``
int64[D + 1]               document indices: 0, then the sequence count at each document end
=========================  ==========================================================

A document is one or more consecutive sequences; megarch's preprocessing writes one sequence per
document. Files are written under temporary names and renamed when complete, ``.bin`` first and
``.idx`` last: the ``.idx`` is what marks a dataset as present.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
from collections.abc import Sequence
from functools import cached_property
from types import TracebackType

import numpy as np

from megarch.atomic import temporary_name
from megarch.data.errors import DataError, make_output_dir

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
HEADER_SIZE = _HEADER.size  # 34 bytes

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_REPREPROCESS = "re-run preprocessing (megarch-data preprocess) to rebuild it"
_COPY_CHUNK_BYTES = 16 * 2**20


def idx_path(path_prefix: str) -> str:
    """The index file of the dataset at ``path_prefix``."""
    return path_prefix + ".idx"


def bin_path(path_prefix: str) -> str:
    """The token file of the dataset at ``path_prefix``."""
    return path_prefix + ".bin"


def dataset_exists(path_prefix: str) -> bool:
    """Whether a published dataset (both ``.idx`` and ``.bin``) exists at ``path_prefix``."""
    return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))


def best_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token dtype for ``vocab_size`` ids: uint16 when they fit, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def dtype_code(dtype: np.dtype | type | str) -> int:
    """The ``.idx`` code of ``dtype``; ValueError for a dtype the format cannot store."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt} cannot be stored in an indexed dataset; use one of {names}")
    return _CODE_OF_DTYPE[dt]


class IndexedDatasetWriter:
    """Write an indexed dataset at ``path_prefix`` (``.bin`` + ``.idx``), atomically.

    Tokens stream to a temporary ``.bin`` as they are added; the index is kept in memory (12 bytes
    per sequence, 8 per document) and written by :meth:`finalize`. Used as a context manager, a
    clean exit finalizes and an exception aborts (temporary files removed, nothing published).
    """

    def __init__(self, path_prefix: str, dtype: np.dtype | type | str) -> None:
        self.path_prefix = path_prefix
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate early
        self._bin_tmp = temporary_name(bin_path(path_prefix))
        self._idx_tmp = temporary_name(idx_path(path_prefix))
        self._bin_file = open(self._bin_tmp, "wb")  # closed by finalize/abort
        self._lengths: list[np.ndarray] = []  # int32 chunks
        self._doc_ends: list[np.ndarray] = []  # int64 chunks: sequence count at document ends
        self._num_sequences = 0
        self._num_documents = 0
        self._num_tokens = 0
        self._state = "open"  # open -> written -> published, or -> aborted

    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return self._num_documents

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return self._num_sequences

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return self._num_tokens

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Add one document made of one sequence."""
        tokens = np.asarray(tokens)
        self.add_array(tokens, np.array([tokens.size], dtype=np.int64))

    def add_document_sequences(self, sequences: Sequence[np.ndarray | Sequence[int]]) -> None:
        """Add one document made of several sequences (e.g. sentences), in order."""
        arrays = [np.asarray(s).reshape(-1) for s in sequences]
        if not arrays:
            raise ValueError("a document needs at least one sequence")
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        self._append(np.concatenate(arrays), lengths, np.array([lengths.size], dtype=np.int64))

    def add_array(self, flat_tokens: np.ndarray, doc_lengths: np.ndarray | Sequence[int]) -> None:
        """Add many one-sequence documents at once: ``flat_tokens`` split by ``doc_lengths``."""
        lengths = np.asarray(doc_lengths, dtype=np.int64).reshape(-1)
        self._append(np.asarray(flat_tokens).reshape(-1), lengths, np.ones_like(lengths))

    def _append(self, flat: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: np.ndarray) -> None:
        """Append sequences (``seq_lengths``) grouped into documents (``seqs_per_doc``)."""
        if self._state != "open":
            raise RuntimeError(f"{self.path_prefix}: cannot add to a {self._state} writer")
        if seq_lengths.size and (seq_lengths.min() < 0 or seq_lengths.max() >= 2**31):
            raise ValueError(f"{self.path_prefix}: sequence lengths must lie in [0, 2**31)")
        if int(seq_lengths.sum()) != flat.size:
            raise ValueError(
                f"{self.path_prefix}: lengths sum to {int(seq_lengths.sum())} but "
                f"{flat.size} tokens were given"
            )
        self._bin_file.write(self._checked_cast(flat).tobytes())
        self._lengths.append(seq_lengths.astype(np.int32))
        self._doc_ends.append(self._num_sequences + np.cumsum(seqs_per_doc, dtype=np.int64))
        self._num_sequences += int(seq_lengths.size)
        self._num_documents += int(seqs_per_doc.size)
        self._num_tokens += int(flat.size)

    def add_dataset(self, dataset: IndexedDataset) -> None:
        """Append a whole dataset of the same dtype: its ``.bin`` is copied in chunks."""
        if self._state != "open":
            raise RuntimeError(f"{self.path_prefix}: cannot add to a {self._state} writer")
        if dataset.dtype != self.dtype:
            raise DataError(
                f"cannot add {dataset.path_prefix} (dtype {dataset.dtype}) to {self.path_prefix} "
                f"(dtype {self.dtype}); re-run preprocessing of one with the other's dtype"
            )
        with open(bin_path(dataset.path_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin_file, _COPY_CHUNK_BYTES)
        self._lengths.append(np.array(dataset.sequence_lengths, dtype=np.int32))
        self._doc_ends.append(self._num_sequences + dataset.document_indices[1:])
        self._num_sequences += len(dataset)
        self._num_documents += dataset.num_documents
        self._num_tokens += dataset.num_tokens

    def _checked_cast(self, flat: np.ndarray) -> np.ndarray:
        """``flat`` as the dataset dtype; DataError if a token id does not fit it."""
        if flat.dtype == self.dtype:
            return np.ascontiguousarray(flat)
        if self.dtype.kind in "iu":
            if flat.size and flat.dtype.kind not in "iub":
                raise TypeError(
                    f"{self.path_prefix}: token ids must be integers, got an array of {flat.dtype}"
                )
            if flat.size and not np.can_cast(flat.dtype, self.dtype):
                info = np.iinfo(self.dtype)
                bad = (flat < info.min) | (flat > info.max)
                if bad.any():
                    raise token_overflow_error(self.path_prefix, int(flat[bad][0]), self.dtype)
        return flat.astype(self.dtype)

    def finalize(self, publish: bool = True) -> None:
        """Write the index; with ``publish`` also rename both files into place.

        ``finalize(publish=False)`` leaves complete files under temporary names so several
        datasets can be published together (see :meth:`publish`).
        """
        if self._state != "open":
            raise RuntimeError(f"{self.path_prefix}: cannot finalize a {self._state} writer")
        try:
            self._bin_file.close()
            lengths = _concat(self._lengths, np.int32)
            doc_indices = np.concatenate([np.zeros(1, np.int64), _concat(self._doc_ends, np.int64)])
            write_index(self._idx_tmp, self.dtype, lengths, doc_indices)
        except BaseException:
            self.abort()
            raise
        self._lengths, self._doc_ends = [], []
        self._state = "written"
        if publish:
            self.publish()

    def publish(self) -> None:
        """Rename the finalized files into place: any old ``.idx`` goes first, new ``.idx`` last."""
        if self._state != "written":
            raise RuntimeError(f"{self.path_prefix}: publish needs finalize(publish=False) first")
        with contextlib.suppress(FileNotFoundError):
            os.remove(idx_path(self.path_prefix))  # the old dataset stops looking whole first
        os.replace(self._bin_tmp, bin_path(self.path_prefix))
        os.replace(self._idx_tmp, idx_path(self.path_prefix))
        self._state = "published"
        logger.debug(
            "wrote %s: %d documents, %d tokens",
            self.path_prefix,
            self._num_documents,
            self._num_tokens,
        )

    def abort(self) -> None:
        """Discard everything written; nothing is published. Safe to call more than once."""
        if self._state == "published":
            return
        self._bin_file.close()
        for path in (self._bin_tmp, self._idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        self._state = "aborted"

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()


def token_overflow_error(where: str, token_id: int, dtype: np.dtype) -> DataError:
    """The DataError for a token id that ``dtype`` cannot hold."""
    info = np.iinfo(dtype)
    return DataError(
        f"{where}: token id {token_id} does not fit the dataset dtype {dtype} "
        f"(range {info.min}..{info.max}); use a wider dtype (int32), or let the dtype be chosen "
        "from the tokenizer's vocabulary size"
    )


def _concat(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)


def write_index(
    path: str, dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray
) -> None:
    """Write a ``.idx`` file at ``path`` (pointers are derived from the lengths)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    doc_indices = np.asarray(document_indices, dtype=np.int64)
    header = _HEADER.pack(MAGIC, VERSION, dtype_code(dtype), lengths.size, doc_indices.size)
    with open(path, "wb") as f:
        f.write(header)
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_indices.tobytes())


class IndexedDataset:
    """Read-only, memory-mapped view of the dataset at ``path_prefix``; validated on open.

    ``tokens`` is the whole ``.bin`` as one 1-D array; document ``i`` is
    ``tokens[document_token_offsets[i]:document_token_offsets[i + 1]]``. Pickles by path, so it
    can be handed to DataLoader workers.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        self._open()

    def _open(self) -> None:
        idx, bin_ = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for path in (idx, bin_):
            if not os.path.isfile(path):
                raise DataError(f"{path}: file not found; {_REPREPROCESS} or fix the path")
        dtype, num_sequences, num_doc_indices = _read_header(idx)
        self._dtype = dtype
        idx_map = np.memmap(idx, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self._lengths = np.frombuffer(idx_map, np.int32, num_sequences, offset)
        offset += self._lengths.nbytes
        self._pointers = np.frombuffer(idx_map, np.int64, num_sequences, offset)
        offset += self._pointers.nbytes
        self._doc_indices = np.frombuffer(idx_map, np.int64, num_doc_indices, offset)
        self._validate(idx, bin_)
        if os.path.getsize(bin_) == 0:
            self._tokens = np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
        else:
            self._tokens = np.memmap(bin_, dtype=dtype, mode="r")

    def _validate(self, idx: str, bin_: str) -> None:
        """Check the index against itself and the ``.bin`` size (vectorised)."""
        lengths, pointers, docs = self._lengths, self._pointers, self._doc_indices
        if lengths.size and lengths.min() < 0:
            raise DataError(
                f"{idx}: negative sequence length; the index is corrupt, {_REPREPROCESS}"
            )
        seq_ends = np.cumsum(lengths, dtype=np.int64)
        expected_pointers = (seq_ends - lengths) * self._dtype.itemsize
        if not np.array_equal(pointers, expected_pointers):
            first = int(np.flatnonzero(pointers != expected_pointers)[0])
            raise DataError(
                f"{idx}: sequence {first} starts at byte {int(pointers[first])} but the lengths "
                f"before it put it at {int(expected_pointers[first])}; the index is corrupt, "
                f"{_REPREPROCESS}"
            )
        num_tokens = int(seq_ends[-1]) if seq_ends.size else 0
        expected_bin = num_tokens * self._dtype.itemsize
        actual_bin = os.path.getsize(bin_)
        if actual_bin != expected_bin:
            what = "the file is truncated" if actual_bin < expected_bin else "it has trailing bytes"
            raise DataError(
                f"{bin_}: {actual_bin} bytes but its index says {num_tokens} {self._dtype} tokens "
                f"({expected_bin} bytes); {what}: {_REPREPROCESS}"
            )
        if docs[0] != 0:
            problem = f"start at {int(docs[0])} instead of at 0"
        elif docs[-1] != lengths.size:
            problem = f"end at {int(docs[-1])} instead of at the sequence count {lengths.size}"
        elif (np.diff(docs) < 0).any():
            problem = f"decrease at document {int(np.flatnonzero(np.diff(docs) < 0)[0])}"
        else:
            return
        raise DataError(
            f"{idx}: the document indices {problem}; the index is corrupt, {_REPREPROCESS}"
        )

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, dtype={self._dtype}, "
            f"sequences={len(self)}, documents={self.num_documents})"
        )

    @property
    def dtype(self) -> np.dtype:
        """The token dtype."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """Tokens per sequence, int32 ``[num_sequences]``."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """Byte offset of each sequence in ``.bin``, int64 ``[num_sequences]``."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """Sequence index bounds of documents, int64 ``[num_documents + 1]`` starting at 0."""
        return self._doc_indices

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return self._doc_indices.size - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens in ``.bin``."""
        return int(self._tokens.size)

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the dataset, one 1-D memory-mapped array."""
        return self._tokens

    @cached_property
    def sequence_token_offsets(self) -> np.ndarray:
        """Token offset of each sequence, int64 ``[num_sequences + 1]``."""
        offsets = np.zeros(self._lengths.size + 1, dtype=np.int64)
        np.cumsum(self._lengths, dtype=np.int64, out=offsets[1:])
        return offsets

    @cached_property
    def document_token_offsets(self) -> np.ndarray:
        """Token offset of each document, int64 ``[num_documents + 1]``."""
        return self.sequence_token_offsets[self._doc_indices]

    @cached_property
    def document_lengths(self) -> np.ndarray:
        """Tokens per document, int64 ``[num_documents]``."""
        return np.diff(self.document_token_offsets)

    def __len__(self) -> int:
        return int(self._lengths.size)

    def get(self, seq_idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``seq_idx`` (to its end by default)."""
        seq_idx = _check_index(seq_idx, len(self), "sequence")
        seq_len = int(self._lengths[seq_idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens {offset}:{offset + length} out of range for sequence {seq_idx} "
                f"of length {seq_len}"
            )
        start = int(self._pointers[seq_idx]) // self._dtype.itemsize + offset
        return np.asarray(self._tokens[start : start + length])

    def __getitem__(self, seq_idx: int) -> np.ndarray:
        return self.get(seq_idx)

    def document(self, doc_idx: int) -> np.ndarray:
        """All tokens of document ``doc_idx``."""
        doc_idx = _check_index(doc_idx, self.num_documents, "document")
        offsets = self.document_token_offsets
        return np.asarray(self._tokens[offsets[doc_idx] : offsets[doc_idx + 1]])


def _check_index(index: int, size: int, what: str) -> int:
    index = int(index)
    if index < 0:
        index += size
    if not 0 <= index < size:
        raise IndexError(f"{what} index out of range for a dataset of {size} {what}s")
    return index


def _read_header(idx: str) -> tuple[np.dtype, int, int]:
    """Parse and check the ``.idx`` header: (dtype, sequence count, document-index count)."""
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE and head == MAGIC[: len(head)]:
        raise DataError(
            f"{idx}: the file is truncated ({size} bytes, header incomplete); {_REPREPROCESS}"
        )
    if head[: len(MAGIC)] != MAGIC:
        raise DataError(
            f"{idx}: not a Megatron indexed dataset (bad magic {head[:9]!r}, expected {MAGIC!r}); "
            f"{_REPREPROCESS}"
        )
    if len(head) < HEADER_SIZE:
        raise DataError(
            f"{idx}: the file is truncated ({size} bytes, header incomplete); {_REPREPROCESS}"
        )
    _, version, code, num_sequences, num_doc_indices = _HEADER.unpack(head)
    if version != VERSION:
        raise DataError(
            f"{idx}: unsupported index version {version} (only version {VERSION} is supported); "
            f"{_REPREPROCESS}"
        )
    if code not in DTYPE_CODES:
        raise DataError(
            f"{idx}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)}); the index is "
            f"corrupt, {_REPREPROCESS}"
        )
    expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_indices
    if size != expected or num_doc_indices < 1:
        what = "the file is truncated" if size < expected else "it has trailing bytes"
        raise DataError(
            f"{idx}: {size} bytes but its header ({num_sequences} sequences, {num_doc_indices} "
            f"document indices) needs {expected}; {what}: {_REPREPROCESS}"
        )
    return DTYPE_CODES[code], int(num_sequences), int(num_doc_indices)


def merge_datasets(input_prefixes: Sequence[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets (same dtype) into one at ``output_prefix``, streaming the ``.bin``s.

    Documents keep their order: all of the first input, then the second, and so on. The output is
    written under temporary names and published only when complete.
    """
    if not input_prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    first = IndexedDataset(input_prefixes[0])
    make_output_dir(os.path.dirname(os.path.abspath(output_prefix)), "--output")
    with IndexedDatasetWriter(output_prefix, first.dtype) as writer:
        for prefix in input_prefixes:
            dataset = IndexedDataset(prefix)
            if dataset.dtype != first.dtype:
                raise DataError(
                    f"cannot merge {prefix} (dtype {dataset.dtype}) with {input_prefixes[0]} "
                    f"(dtype {first.dtype}); re-run preprocessing of one with the other's dtype"
                )
            writer.add_dataset(dataset)
    return IndexedDataset(output_prefix)
