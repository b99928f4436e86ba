"""Bucketed data-parallel gradient all-reduce on real gloo processes equals one flat all-reduce
of every gradient (the unbucketed sum), bitwise on two ranks, for bucket sizes from smaller
than one gradient to larger than the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megarch.config.train import ConfigError, ParallelConfig
from megarch.model import build_model
from megarch.parallel.data_parallel import all_reduce_grads
from megarch.parallel.spawn import spawn
from tests.parallel.helpers import tiny_config

BUCKETS_MB = (1e-4, 2e-3, 0.01, 25.0)
"""Bucket sizes (MiB): 1e-4 (26 float32 elements) is smaller than every matrix gradient of
the tiny model; 2e-3 and 0.01 pack a few gradients each; 25 MiB holds the whole model."""


def _grads(model: torch.nn.Module, rank: int) -> None:
    """Rank-dependent gradients: float32 of several magnitudes (so that sums round), and one
    parameter left without a gradient (it counts as zero)."""
    gen = torch.Generator().manual_seed(100 + rank)
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i == 3:
            p.grad = None
            continue
        scale = 10.0 ** (i % 5 - 2)
        p.grad = torch.randn(p.shape, generator=gen) * scale


def _reduce(rank: int, world: int, arch: str) -> dict:
    """Per bucket size: the reduced gradients and the number of all-reduce calls; and the
    reference: one flat float32 all-reduce of every gradient."""
    group = dist.new_group(list(range(world)))
    model = build_model(tiny_config(arch))
    _grads(model, rank)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])
    dist.all_reduce(flat, group=group)
    calls = [0]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    out = {"reference": flat, "sizes": [p.numel() for p in model.parameters()]}
    dist.all_reduce = counting
    try:
        for mb in BUCKETS_MB:
            _grads(model, rank)
            calls[0] = 0
            all_reduce_grads(model, group, bucket_mb=mb)
            out[mb] = (torch.cat([p.grad.reshape(-1) for p in model.parameters()]), calls[0])
    finally:
        dist.all_reduce = original
    return out


@pytest.mark.parametrize("arch", ["encoder_decoder"])
def test_bucketed_all_reduce_equals_the_flat_sum(arch):
    results = spawn(2)(_reduce, arch)
    for out in results:
        reference, sizes = out["reference"], out["sizes"]
        assert max(sizes) > 1e-4 * 2**20 / 4  # the smallest bucket is below one gradient
        assert reference.abs().max() > 0
        for mb in BUCKETS_MB:
            grads, calls = out[mb]
            assert torch.equal(grads, reference), f"bucket {mb} MiB"
        capacity = int(1e-4 * 2**20) // 4
        # the smallest bucket: every larger gradient alone, the small ones packed
        assert out[1e-4][1] >= sum(n > capacity for n in sizes)
        assert out[25.0][1] == 1  # the whole tiny model: one call, as one flat all-reduce
        assert out[2e-3][1] > out[0.01][1] > 1
    assert torch.equal(results[0]["reference"], results[1]["reference"])


def test_bucket_size_must_be_positive():
    with pytest.raises(ConfigError, match="parallel.grad_bucket_mb=0"):
        ParallelConfig(grad_bucket_mb=0).validate()
    with pytest.raises(ValueError, match="bucket_mb=-1"):
        all_reduce_grads(torch.nn.Linear(2, 2), None, bucket_mb=-1)


def _zero_step_broadcasts(rank: int, world: int, bucket_view: bool) -> dict:
    """One ZeRO-1 AdamW step of the tiny model built the trainer's way (``zero1``): how many
    parameter broadcasts it issues, and the updated parameters."""
    from megarch.parallel.data_parallel import zero1

    model = build_model(tiny_config("causal_decoder"), seed=0)
    optimizer = zero1(torch.optim.AdamW(model.parameters(), lr=1e-2), dist.group.WORLD,
                      bucket_view=bucket_view)
    _grads(model, 0)  # the same gradients on every rank: the step is the unsharded one
    calls = []
    real = dist.broadcast

    def counting(tensor, *args, **kwargs):  # the real broadcast, counted
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.broadcast = counting
    try:
        optimizer.step()
    finally:
        dist.broadcast = real
    return {"calls": calls, "params": [p.detach().clone() for p in model.parameters()],
            "n_params": sum(1 for _ in model.parameters())}


def test_zero1_broadcast_is_one_flat_bucket_per_rank():
    """The trainer's ZeRO-1 with the overlapped reduction (``bucket_view``) broadcasts the
    updated parameters as one flat bucket per owner: ``dp`` broadcasts a step, covering every
    element once, where the per-parameter path issues one per parameter. Both update the
    parameters the same way (checked against a plain AdamW step of one process, within float
    rounding: the sharded step runs AdamW's foreach path over other tensor lists)."""
    bucketed = spawn(2)(_zero_step_broadcasts, True)
    per_param = spawn(2)(_zero_step_broadcasts, False)
    model = build_model(tiny_config("causal_decoder"), seed=0)
    n_elements = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _grads(model, 0)
    optimizer.step()
    for rank in range(2):
        assert len(bucketed[rank]["calls"]) == 2
        assert sum(bucketed[rank]["calls"]) == n_elements
        assert len(per_param[rank]["calls"]) == per_param[rank]["n_params"] > 2
        for got, other, want in zip(bucketed[rank]["params"], per_param[rank]["params"],
                                    model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach())  # AdamW over fewer tensors
            torch.testing.assert_close(other, want.detach())  # rounds its own way
