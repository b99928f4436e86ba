"""The embedded corpus, ready to train on: stdlib docstrings -> SentencePiece -> .bin/.idx.

``megarch-data demo`` and ``megarch-train`` (when ``data.paths`` is the embedded default and
missing) both call :func:`prepare_embedded`, so a fresh checkout trains with no download.
Every step is skipped when its output already exists, and each output is published atomically.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "stdlib"
"""Dataset prefix (inside the embedded directory) of the embedded corpus."""
EMBEDDED_TOKENIZER = "stdlib_sp.model"
"""File name (inside the embedded directory) of the embedded corpus's tokenizer."""


def embedded_paths(directory: str) -> tuple[str, str, str]:
    """``(corpus_jsonl, dataset_prefix, tokenizer_model)`` of the embedded corpus in
    ``directory``."""
    return (
        os.path.join(directory, "stdlib.jsonl"),
        os.path.join(directory, EMBEDDED_PREFIX),
        os.path.join(directory, EMBEDDED_TOKENIZER),
    )


def is_prepared(directory: str) -> bool:
    """True when the dataset and the tokenizer of the embedded corpus exist in ``directory``."""
    _, prefix, model = embedded_paths(directory)
    return os.path.exists(model) and os.path.exists(prefix + "_text_document.idx")


def prepare_embedded(
    directory: str, vocab_size: int = 8000, workers: int = 1, progress: bool = True
) -> tuple[str, str]:
    """Build the embedded corpus in ``directory`` (what is present is reused).

    Writes ``stdlib.jsonl`` (the corpus), ``stdlib_sp.model`` (a T5-style SentencePiece model
    of ``vocab_size`` ids, sentinels included) and ``stdlib_text_document.{bin,idx}``.

    Returns:
        ``(prefix, tokenizer_path)``: the dataset prefix to put in ``data.paths`` and the
        tokenizer to put in ``data.tokenizer``.
    """
    from megarch.data.corpus import build_stdlib_corpus
    from megarch.data.preprocess import preprocess
    from megarch.data.tokenizers import train_sentencepiece

    os.makedirs(directory, exist_ok=True)
    corpus, prefix, model = embedded_paths(directory)
    if not os.path.exists(corpus):
        build_stdlib_corpus(corpus, progress=progress)
    if not os.path.exists(model):
        train_sentencepiece([corpus], model[: -len(".model")], vocab_size=vocab_size,
                            progress=progress)
    if not os.path.exists(prefix + "_text_document.idx"):
        preprocess([corpus], prefix, model, workers=workers, progress=progress)  # logs a summary
    log.info("embedded corpus ready: %s (tokenizer %s)", prefix, model)
    return prefix, model
