"""Train/valid/test splits over documents and weighted blending of several datasets.

Both are deterministic and prefix-stable: sample i of a blend is the same whatever the total
number of samples asked for.
"""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalised shares for train, valid, test (missing ones are 0)."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(
            f"data.split={split!r}: give up to three non-negative shares for train,valid,test "
            "that do not sum to zero, e.g. '969,30,1'"
        )
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_range(n_docs: int, split: str, name: str) -> tuple[int, int]:
    """The contiguous document range [begin, end) of split ``name`` out of ``n_docs``."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}: use one of {', '.join(SPLIT_NAMES)}")
    shares = parse_split(split)
    bounds = np.round(np.concatenate(([0.0], np.cumsum(shares))) * n_docs).astype(int)
    bounds[-1] = n_docs
    i = SPLIT_NAMES.index(name)
    return int(bounds[i]), int(bounds[i + 1])


def blend_schedule(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each of the first ``num_samples`` blended samples, and its index there.

    Dataset d's k-th sample is placed at time (k + 0.5) / w_d and samples are served in time
    order (ties by dataset order), so every prefix of the blend holds each dataset in proportion
    to its weight (within one sample) and the order never depends on ``num_samples``.
    Returns (dataset_index, sample_index_within_dataset), both int64 arrays of ``num_samples``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)} must be non-negative, not all zero")
    w = w / w.sum()
    times, owners, ranks = [], [], []
    for d, wd in enumerate(w):
        if wd == 0:
            continue
        n = int(np.ceil(wd * num_samples)) + 1
        k = np.arange(n, dtype=np.int64)
        times.append((k + 0.5) / wd)
        owners.append(np.full(n, d, dtype=np.int64))
        ranks.append(k)
    times_all = np.concatenate(times)
    order = np.lexsort((np.concatenate(owners), times_all))[:num_samples]
    return np.concatenate(owners)[order], np.concatenate(ranks)[order]
