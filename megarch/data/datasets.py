"""From a :class:`DataConfig` to a dataset of samples: paths, splits, objective, blending."""

from __future__ import annotations

import os

import numpy as np
import torch

from megarch.config.data import DataConfig
from megarch.data import span_corruption
from megarch.data.blending import blend_schedule, split_range
from megarch.data.errors import DataError
from megarch.data.indexed_dataset import IndexedDataset
from megarch.data.indices import TokenRows
from megarch.data.samples import (
    FLMSamples,
    MLMSamples,
    MultitaskSamples,
    PLMDecoderSamples,
    PLMEncoderDecoderSamples,
    dataset_fingerprint,
)


def resolve_prefix(path: str, key: str) -> str:
    """The dataset prefix for ``path``: itself if ``path.idx`` exists, else Megatron's naming
    ``{path}_{key}_document`` as ``megarch-data preprocess --output path`` writes it."""
    for candidate in (path, f"{path}_{key}_document"):
        if os.path.exists(candidate + ".idx"):
            return candidate
    raise DataError(
        f"{path}: no dataset found (looked for {path}.idx and {path}_{key}_document.idx); "
        f"create it with `megarch-data preprocess --input FILE.jsonl --output {path}"
        f"{' --json-keys inputs targets' if key in ('inputs', 'targets') else ''}`"
    )


def default_cache_dir(cfg: DataConfig) -> str:
    """``index-cache`` beside the first dataset, unless ``data.cache_dir`` says otherwise."""
    if cfg.cache_dir:
        return cfg.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(cfg.paths[0])), "index-cache")


def _split_docs(n_docs: int, cfg: DataConfig, split: str, where: str) -> np.ndarray:
    begin, end = split_range(n_docs, cfg.split, split)
    if end <= begin:
        raise DataError(
            f"{where}: the {split!r} split of data.split={cfg.split!r} holds no documents out "
            f"of {n_docs}; give it a larger share or use more data"
        )
    return np.arange(begin, end, dtype=np.int64)


def build_single(
    cfg: DataConfig, path: str, tokenizer, split: str, num_samples: int | None
) -> torch.utils.data.Dataset:
    """The samples of one dataset prefix for ``cfg.objective`` and ``cfg.layout``."""
    cache_dir = default_cache_dir(cfg)
    if cfg.objective == "multitask":
        inputs_prefix = resolve_prefix(path, "inputs")
        targets_prefix = resolve_prefix(path, "targets")
        inputs, targets = IndexedDataset(inputs_prefix), IndexedDataset(targets_prefix)
        if inputs.num_documents != targets.num_documents:
            raise DataError(
                f"{inputs_prefix} has {inputs.num_documents} examples but {targets_prefix} has "
                f"{targets.num_documents}: preprocess inputs and targets together "
                "(--json-keys inputs targets) so they stay aligned"
            )
        docs = _split_docs(inputs.num_documents, cfg, split, inputs_prefix)
        return MultitaskSamples(
            inputs, targets, docs, tokenizer, layout=cfg.layout, inputs_len=cfg.inputs_len,
            targets_len=cfg.targets_len, num_samples=num_samples, seed=cfg.seed,
            cache_dir=cache_dir,
            fingerprint=dataset_fingerprint(inputs_prefix) + dataset_fingerprint(targets_prefix),
        )
    prefix = resolve_prefix(path, cfg.text_key)
    dataset = IndexedDataset(prefix)
    docs = _split_docs(dataset.num_documents, cfg, split, prefix)
    L = cfg.seq_len
    if cfg.objective == "mlm":
        raw = span_corruption.raw_length_for(
            L, noise_density=cfg.noise_density, mean_span=cfg.mean_noise_span
        )
        row_len, stride, per_sample = raw, raw, 1
    elif cfg.objective == "plm" and cfg.layout == "encoder_decoder":
        row_len, stride, per_sample = L, L, 2
    else:
        row_len, stride, per_sample = L + 1, L, 1
    rows = TokenRows(dataset, docs, row_len, stride, per_sample, num_samples, cfg.seed,
                     cache_dir, dataset_fingerprint(prefix))
    if cfg.objective == "flm":
        return FLMSamples(rows, tokenizer, cfg.seed, segment_docs=cfg.segment_docs)
    if cfg.objective == "plm":
        if cfg.layout == "encoder_decoder":
            return PLMEncoderDecoderSamples(rows, tokenizer, cfg.seed)
        return PLMDecoderSamples(rows, tokenizer, cfg.seed)
    return MLMSamples(rows, tokenizer, cfg.seed, cfg.layout, L, cfg.noise_density,
                      cfg.mean_noise_span)


class BlendedSamples(torch.utils.data.Dataset):
    """Several datasets served in proportion to their weights (see ``blend_schedule``)."""

    def __init__(self, datasets: list, weights: list[float], num_samples: int):
        self.datasets = datasets
        self.weights = weights
        self.which, self.index = blend_schedule(weights, num_samples)

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.which[index])][int(self.index[index])]

    def build(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` as numpy arrays."""
        return self.datasets[int(self.which[index])].build(int(self.index[index]))


def _token_count(cfg: DataConfig, path: str) -> int:
    key = "targets" if cfg.objective == "multitask" else cfg.text_key
    return int(np.sum(IndexedDataset(resolve_prefix(path, key)).document_lengths))


def build_dataset(
    cfg: DataConfig, tokenizer, split: str = "train", num_samples: int | None = None
) -> torch.utils.data.Dataset:
    """The dataset ``cfg`` describes, for ``split``, holding at least ``num_samples`` samples
    (``None``: one epoch). Several ``cfg.paths`` are blended by ``cfg.weights`` (default: by
    token count)."""
    cfg.validate()
    if not cfg.paths:
        raise DataError("data.paths is empty: give the prefix written by megarch-data preprocess")
    if len(cfg.paths) == 1:
        return build_single(cfg, cfg.paths[0], tokenizer, split, num_samples)
    weights = cfg.weights or [float(_token_count(cfg, p)) for p in cfg.paths]
    parts = [build_single(cfg, p, tokenizer, split, None) for p in cfg.paths]
    total = num_samples if num_samples is not None else sum(len(p) for p in parts)
    which, index = blend_schedule(weights, total)
    for d, path in enumerate(cfg.paths):
        needed = int(index[which == d].max(initial=-1)) + 1
        if needed > len(parts[d]):
            parts[d] = build_single(cfg, path, tokenizer, split, needed)
    return BlendedSamples(parts, weights, total)
