"""Batches are the same whatever the worker count, data-parallel size or resume point."""

import pytest
import torch

from megarch.config.data import DataConfig
from megarch.data.datasets import build_dataset
from megarch.data.loader import MicroBatchSampler, make_loader
from tests.data.helpers import TOKENIZER, random_docs, write_docs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    prefix = write_docs(str(root / "c_text_document"), random_docs(300, seed=3))
    cfg = DataConfig(paths=[prefix], objective="plm", seq_len=32, split="1",
                     cache_dir=str(root / "cache"))
    return build_dataset(cfg, TOKENIZER, "train", 96)


def collect(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def same(a, b):
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_sampler_covers_global_batches_for_any_dp_size():
    for dp in (1, 2, 4):
        per_step = {}
        for rank in range(dp):
            sampler = MicroBatchSampler(64, micro_batch=2, global_batch=16, dp_rank=rank,
                                        dp_size=dp)
            batches = list(sampler)
            assert len(batches) == len(sampler) == 4 * 8 // dp
            for n, batch in enumerate(batches):
                per_step.setdefault(n // sampler.accumulation_steps, []).extend(batch)
        for step, indices in per_step.items():
            assert sorted(indices) == list(range(16 * step, 16 * step + 16))


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not a multiple"):
        MicroBatchSampler(64, micro_batch=3, global_batch=16, dp_size=2)


def test_worker_count_does_not_change_batches(dataset):
    serial = collect(make_loader(dataset, 4, 8, num_workers=0))
    parallel = collect(make_loader(dataset, 4, 8, num_workers=2))
    assert len(serial) == len(dataset) // 4
    assert same(serial, parallel)


def test_resume_continues_exactly(dataset):
    straight = collect(make_loader(dataset, 4, 8, num_workers=0))
    resumed = collect(make_loader(dataset, 4, 8, consumed_samples=40, num_workers=2))
    assert same(straight[10:], resumed)


def test_data_parallel_union_equals_single_process(dataset):
    single = collect(make_loader(dataset, 4, 8, num_workers=0))
    ranks = [collect(make_loader(dataset, 2, 8, dp_rank=r, dp_size=2, num_workers=0))
             for r in range(2)]
    for step in range(len(single) // 2):
        whole = torch.cat([single[2 * step]["tokens"], single[2 * step + 1]["tokens"]])
        parts = torch.cat([ranks[r][2 * step + m]["tokens"] for m in range(2) for r in range(2)])
        assert torch.equal(whole, parts)
