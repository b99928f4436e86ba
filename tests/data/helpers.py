"""Small synthetic datasets with known content, for the sample-builder tests."""

from __future__ import annotations

import types

import numpy as np

from megarch.data.indexed_dataset import IndexedDatasetWriter

VOCAB, PAD, EOS, BOS = 1000, 0, 1, 0

TOKENIZER = types.SimpleNamespace(vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, bos_id=BOS)


def random_docs(n_docs: int, seed: int, low: int = 5, high: int = 120) -> list[np.ndarray]:
    """Documents of random ordinary tokens (never a special id or sentinel), each ending in EOS."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        body = rng.integers(3, VOCAB - 100, int(rng.integers(low, high)))
        docs.append(np.append(body, EOS).astype(np.int64))
    return docs


def write_docs(prefix: str, docs: list[np.ndarray]) -> str:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return prefix
