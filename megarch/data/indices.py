"""Deterministic sample indices, built once and cached on disk.

Every sample a dataset serves is a pure function of (seed, sample index) and the dataset
description: no state lives in data-loader workers or ranks, so any number of workers or ranks
sees the same samples and a resumed run continues exactly. The indices that make this cheap
(the per-epoch document order, where each row starts, the sample shuffle, the multitask
packing) are computed once, written to a cache directory under a temporary name and renamed
when complete, then memory-mapped by every rank. Concurrent builders serialise on a lock file;
should the lock not work (some network filesystems), they write identical content and the first
rename wins.

All indices are *prefix-stable*: asking for more samples later extends them without changing
the samples already defined. Documents are ordered epoch by epoch (epoch e's permutation depends
only on (seed, e)), and samples are shuffled within blocks of one epoch's worth, so sample i is
the same whether a run asks for ten thousand samples or ten million.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np

from megarch.atomic import atomic_dir
from megarch.data.errors import DataError

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1


def _key(description: dict) -> str:
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # filesystems without flock: builds are idempotent anyway
            pass
        yield


def cached_arrays(
    cache_dir: str, description: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays for ``description``: loaded (memory-mapped) from the cache, or built and cached.

    ``build`` returns a dict of 1-D/2-D numpy arrays; they are saved as ``.npy`` files with a
    ``description.json`` beside them, in a directory named after a hash of the description.
    """
    description = {"format": INDEX_FORMAT_VERSION, **description}
    kind = description.get("kind", "index")
    final = os.path.join(cache_dir, f"{kind}-{_key(description)}")
    os.makedirs(cache_dir, exist_ok=True)
    if not os.path.isdir(final):
        with _lock(final + ".lock"):
            if not os.path.isdir(final):
                logger.info("building %s index in %s", kind, final)
                arrays = build()
                with atomic_dir(final) as tmp:
                    for name, array in arrays.items():
                        np.save(os.path.join(tmp, f"{name}.npy"), array)
                    with open(os.path.join(tmp, "description.json"), "w") as f:
                        json.dump(description, f, indent=1, sort_keys=True)
    names = [n[:-4] for n in os.listdir(final) if n.endswith(".npy")]
    return {name: np.load(os.path.join(final, f"{name}.npy"), mmap_mode="r") for name in names}


def epoch_permutation(n: int, seed: int, epoch: int, salt: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch, salt)."""
    return np.random.default_rng([seed, salt, epoch]).permutation(n)


def doc_order(doc_ids: np.ndarray, seed: int, n_epochs: int) -> np.ndarray:
    """``doc_ids`` shuffled once per epoch, epochs concatenated."""
    orders = [doc_ids[epoch_permutation(len(doc_ids), seed, e, salt=1)] for e in range(n_epochs)]
    return np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64)


def sample_rng(seed: int, index: int, salt: int = 0) -> np.random.Generator:
    """The random generator of sample ``index``: a pure function of (seed, salt, index)."""
    return np.random.Generator(np.random.Philox(key=[seed, salt], counter=index))


def block_shuffle(n_blocks: int, block_size: int, seed: int, salt: int) -> np.ndarray:
    """range(n_blocks * block_size) shuffled within consecutive blocks of ``block_size``.

    Block b's permutation depends only on (seed, salt, b): adding blocks never moves a sample
    of an earlier block.
    """
    blocks = [
        b * block_size + epoch_permutation(block_size, seed, b, salt) for b in range(n_blocks)
    ]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


def rows_in(n_tokens: int, row_len: int, stride: int) -> int:
    """How many rows of ``row_len`` tokens, one every ``stride`` tokens, fit in ``n_tokens``."""
    return 0 if n_tokens < row_len else (n_tokens - row_len) // stride + 1


class TokenRows:
    """Fixed-length rows cut from a split's documents, concatenated in a seeded order.

    The documents ``doc_ids`` of ``dataset`` are shuffled once per epoch and concatenated into
    one token stream; row k is ``stream[k * stride : k * stride + row_len]`` (``stride`` equal to
    ``row_len - 1`` gives rows that overlap by one token, for shifted inputs/labels). Samples of
    ``rows_per_sample`` consecutive rows are shuffled within blocks of one epoch's worth.

    ``sample_rows(i)`` returns the tokens of sample i's rows and, for each row, the offsets at
    which a new document starts inside it.
    """

    def __init__(
        self,
        dataset,
        doc_ids: np.ndarray,
        row_len: int,
        stride: int,
        rows_per_sample: int,
        num_samples: int | None,
        seed: int,
        cache_dir: str,
        fingerprint: str,
    ):
        self.dataset = dataset
        self.row_len = row_len
        self.stride = stride
        self.rows_per_sample = rows_per_sample
        doc_lengths = np.asarray(dataset.document_lengths)[doc_ids]
        epoch_tokens = int(doc_lengths.sum())
        if epoch_tokens < row_len:
            raise DataError(
                f"{fingerprint}: the split has {epoch_tokens} tokens, fewer than one row of "
                f"{row_len}: use more data, a larger split share, or a shorter data.seq_len"
            )
        self.block_size = max(1, rows_in(epoch_tokens, row_len, stride) // rows_per_sample)
        wanted = self.block_size if num_samples is None else max(1, num_samples)
        n_blocks = -(-wanted // self.block_size)
        n_samples = n_blocks * self.block_size
        rows_needed = n_samples * rows_per_sample
        n_epochs = -(-((rows_needed - 1) * stride + row_len) // epoch_tokens)
        description = {
            "kind": "rows",
            "data": fingerprint,
            "docs": [int(doc_ids[0]), int(doc_ids[-1]) + 1, len(doc_ids)],
            "row_len": row_len,
            "stride": stride,
            "rows_per_sample": rows_per_sample,
            "blocks": n_blocks,
            "seed": seed,
        }

        def build() -> dict[str, np.ndarray]:
            order = doc_order(np.asarray(doc_ids, dtype=np.int64), seed, n_epochs)
            lengths = np.asarray(dataset.document_lengths)[order]
            starts_of_docs = np.concatenate(([0], np.cumsum(lengths)))
            row_starts = np.arange(rows_needed, dtype=np.int64) * stride
            row_doc = np.searchsorted(starts_of_docs, row_starts, side="right") - 1
            samples = block_shuffle(n_blocks, self.block_size, seed, salt=2)
            return {
                "doc_order": order,
                "row_doc": row_doc.astype(np.int64),
                "row_offset": row_starts - starts_of_docs[row_doc],
                "sample_first_row": samples * rows_per_sample,
            }

        arrays = cached_arrays(cache_dir, description, build)
        self.doc_order = arrays["doc_order"]
        self.row_doc = arrays["row_doc"]
        self.row_offset = arrays["row_offset"]
        self.sample_first_row = arrays["sample_first_row"]
        self._doc_offsets = np.asarray(dataset.document_token_offsets)
        self._tokens = dataset.tokens

    def __len__(self) -> int:
        return len(self.sample_first_row)

    def row(self, k: int) -> tuple[np.ndarray, list[int]]:
        """Tokens of row k (int64) and the offsets in it where a new document begins."""
        pos, offset = int(self.row_doc[k]), int(self.row_offset[k])
        pieces, doc_starts, filled = [], [], 0
        while filled < self.row_len:
            doc = int(self.doc_order[pos])
            begin, end = int(self._doc_offsets[doc]) + offset, int(self._doc_offsets[doc + 1])
            if offset == 0 and filled > 0:
                doc_starts.append(filled)
            piece = self._tokens[begin : min(end, begin + self.row_len - filled)]
            pieces.append(piece)
            filled += len(piece)
            pos, offset = pos + 1, 0
        return np.concatenate(pieces).astype(np.int64), doc_starts

    def sample_rows(self, index: int) -> list[tuple[np.ndarray, list[int]]]:
        """The ``rows_per_sample`` rows of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is out of range: this index holds {len(self)}")
        first = int(self.sample_first_row[index])
        return [self.row(first + r) for r in range(self.rows_per_sample)]


def pack_examples(
    input_lengths: np.ndarray,
    target_lengths: np.ndarray,
    order_epochs: Callable[[int], np.ndarray],
    num_rows: int | None,
    fits: Callable[[int, int, int, int], bool],
    max_inputs: int,
    max_targets: int,
) -> dict[str, np.ndarray]:
    """Greedy in-order packing of (inputs, targets) examples into rows.

    Examples come epoch by epoch in ``order_epochs(e)``; each is truncated to ``max_inputs`` /
    ``max_targets`` tokens and appended to the current row while ``fits(row_inputs, row_targets,
    example_inputs, example_targets)``; otherwise a new row starts. Stops once ``num_rows``
    rows are complete (``None``: after one epoch, its last row closed as it is). Returns
    ``order`` (example ids in packing order), ``row_starts`` (offsets into ``order``, length
    rows + 1) and ``truncated`` (how many examples were cut).
    """
    order_parts, row_starts, truncated = [], [0], 0
    used_in = used_tgt = 0
    taken = 0
    epoch = 0
    one_epoch = num_rows is None
    while one_epoch or len(row_starts) - 1 < num_rows:
        order = order_epochs(epoch)
        if len(order) == 0:
            raise ValueError("no examples to pack")
        lens_in = np.minimum(input_lengths[order], max_inputs).tolist()
        lens_tgt = np.minimum(target_lengths[order], max_targets).tolist()
        cut = (input_lengths[order] > max_inputs) | (target_lengths[order] > max_targets)
        used = 0
        for n_in, n_tgt in zip(lens_in, lens_tgt, strict=True):
            if taken > row_starts[-1] and not fits(used_in, used_tgt, n_in, n_tgt):
                row_starts.append(taken)
                used_in = used_tgt = 0
                if len(row_starts) - 1 == num_rows:
                    break
            used_in, used_tgt = used_in + n_in, used_tgt + n_tgt
            taken += 1
            used += 1
        order_parts.append(order[:used])
        truncated += int(cut[:used].sum())
        epoch += 1
        if one_epoch:
            row_starts.append(taken)
            break
    return {
        "order": np.concatenate(order_parts).astype(np.int64),
        "row_starts": np.asarray(row_starts, dtype=np.int64),
        "truncated": np.asarray([truncated], dtype=np.int64),
    }
