"""T5 span corruption (the study's MLM objective), as numpy on one raw chunk.

The study's recipe (PAPER.md): noise density 0.15, mean noise span length 3.0. For a chunk of
L raw tokens, ``n_noise = round(0.15 L)`` clipped to [1, L-1] and ``n_spans = max(1,
round(n_noise / 3))``; noise and non-noise tokens are each split at random into ``n_spans``
non-empty runs and interleaved, starting with non-noise. Each noise span becomes one sentinel in
the inputs; the targets are ``sentinel, span`` repeated, then EOS. Sentinel k is
``vocab_size - 1 - k`` (the tokenizer's ``sentinel_id``).

With L = 568 raw tokens this gives 512 input and 114 target tokens (both counting EOS), 626 in
all: :func:`raw_length_for` finds that L from a token budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
N_SENTINELS = 100


def _round_half_even(x: float) -> int:
    # T5 rounds with tf.round / numpy's round: half to even. Python's round() does the same.
    return int(round(x))


def noise_counts(
    length: int, noise_density: float = NOISE_DENSITY, mean_span: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(noise tokens, noise spans) for a raw chunk of ``length`` tokens."""
    n_noise = min(max(_round_half_even(length * noise_density), 1), length - 1)
    n_spans = max(1, _round_half_even(n_noise / mean_span))
    return n_noise, n_spans


def corrupted_lengths(
    length: int, noise_density: float = NOISE_DENSITY, mean_span: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(input tokens, target tokens), each counting its EOS, for a raw chunk of ``length``."""
    n_noise, n_spans = noise_counts(length, noise_density, mean_span)
    inputs = length - n_noise + n_spans + 1
    targets = n_noise + n_spans + 1
    return inputs, targets


def raw_length_for(
    total_length: int | None = None,
    *,
    inputs_length: int | None = None,
    noise_density: float = NOISE_DENSITY,
    mean_span: float = MEAN_NOISE_SPAN_LENGTH,
) -> int:
    """The longest raw chunk whose corruption fits a budget.

    ``total_length`` bounds inputs + targets (the decoder-only layout, one sequence);
    ``inputs_length`` bounds the encoder inputs alone (T5's encoder-decoder convention).
    ``raw_length_for(626) == 568`` and ``raw_length_for(inputs_length=512) == 568``.
    """
    if (total_length is None) == (inputs_length is None):
        raise ValueError("give exactly one of total_length or inputs_length")
    budget = total_length if total_length is not None else inputs_length
    if budget < 4:
        raise ValueError(f"a span-corruption budget of {budget} tokens is too short (need >= 4)")

    def size(raw: int) -> int:
        inputs, targets = corrupted_lengths(raw, noise_density, mean_span)
        return inputs + targets if total_length is not None else inputs

    raw = 2
    while size(raw + 1) <= budget:
        raw += 1
    return raw


def _random_segmentation(rng: np.random.Generator, n_items: int, n_segments: int) -> np.ndarray:
    """Lengths of a uniformly random split of ``n_items`` into ``n_segments`` non-empty runs."""
    cuts = np.sort(rng.choice(n_items - 1, size=n_segments - 1, replace=False)) + 1
    bounds = np.concatenate(([0], cuts, [n_items]))
    return np.diff(bounds)


def random_spans_noise_mask(
    rng: np.random.Generator,
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_span: float = MEAN_NOISE_SPAN_LENGTH,
) -> np.ndarray:
    """Boolean mask of ``length``: True on noise tokens, in ``n_spans`` runs, first run clean."""
    n_noise, n_spans = noise_counts(length, noise_density, mean_span)
    noise_lengths = _random_segmentation(rng, n_noise, n_spans)
    clean_lengths = _random_segmentation(rng, length - n_noise, n_spans)
    run_lengths = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    run_is_noise = np.tile(np.array([False, True]), n_spans)
    return np.repeat(run_is_noise, run_lengths)


@dataclass
class Corrupted:
    """One span-corrupted chunk: ``inputs`` and ``targets`` (each ends with EOS)."""

    inputs: np.ndarray
    targets: np.ndarray
    noise_mask: np.ndarray


def corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    vocab_size: int,
    eos_id: int,
    noise_density: float = NOISE_DENSITY,
    mean_span: float = MEAN_NOISE_SPAN_LENGTH,
) -> Corrupted:
    """Span-corrupt one raw chunk; sentinel k is ``vocab_size - 1 - k``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_spans = noise_counts(len(tokens), noise_density, mean_span)[1]
    if n_spans > N_SENTINELS:
        raise ValueError(
            f"a chunk of {len(tokens)} tokens needs {n_spans} sentinels but the tokenizer has "
            f"{N_SENTINELS}: shorten data.seq_len or raise data.mean_noise_span"
        )
    mask = random_spans_noise_mask(rng, len(tokens), noise_density, mean_span)
    inputs = _replace_spans(tokens, mask, vocab_size, eos_id)
    targets = _replace_spans(tokens, ~mask, vocab_size, eos_id)
    return Corrupted(inputs=inputs, targets=targets, noise_mask=mask)


def _replace_spans(
    tokens: np.ndarray, drop: np.ndarray, vocab_size: int, eos_id: int
) -> np.ndarray:
    """Replace each run of ``drop`` with one sentinel (numbered in order), append EOS."""
    starts = drop & ~np.concatenate(([False], drop[:-1]))
    sentinels = vocab_size - np.cumsum(starts)  # vocab_size - 1 - k at the k-th run start
    out = np.where(starts, sentinels, tokens)
    keep = ~drop | starts
    return np.concatenate((out[keep], [eos_id]))


def reconstruct(inputs: np.ndarray, targets: np.ndarray, vocab_size: int, eos_id: int) -> list:
    """Undo :func:`corrupt`: put each target span back in place of its sentinel.

    Used by tests and by ``megarch-data inspect`` to show that a sample loses nothing.
    """
    first_sentinel = vocab_size - N_SENTINELS

    def spans(seq):
        out, key = {}, None
        for tok in seq:
            tok = int(tok)
            if tok >= first_sentinel:
                key = tok
                out[key] = []
            elif key is not None:
                out[key].append(tok)
        return out

    filled = spans(list(targets[:-1]))
    text = []
    for tok in inputs[:-1]:
        tok = int(tok)
        text.extend(filled[tok] if tok >= first_sentinel else [tok])
    return text
