"""Adafactor under tensor parallelism takes the single process's steps (real gloo ranks).

Reference: ``torch.optim.Adafactor`` on the full tensors in one process. Each TP rank runs
megarch's Adafactor on its shards; the shards of its parameters and of its state, gathered by
the checkpoint resharding rule (``row_var`` split along dim 0 with a dim-0 sharded parameter,
``col_var`` along its last dim with a dim-1 sharded one, else replicated; ``variance`` like
its parameter), must equal the reference's, and the replicated states must be identical on
every rank. Once on bare tensors sharded along every kind of dim, once through the models of
every architecture (losses too), once under ZeRO-1.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megarch.config.train import OptimConfig
from megarch.model import build_model, lm_loss
from megarch.parallel import ParallelContext, gather_full_state_dict, load_full_state_dict
from megarch.parallel.data_parallel import zero1
from megarch.parallel.spawn import spawn
from megarch.parallel.tensor_parallel import partition_dims, reduce_sequence_parallel_grads
from megarch.training.adafactor import Adafactor, TensorParallelLayout
from megarch.training.optim import build_optimizer
from tests.parallel.helpers import (
    ARCHS,
    labels_and_mask,
    relative_difference,
    tiny_batch,
    tiny_config,
)

STEPS = 4
TOL = 1e-5  # relative: reductions summed in another order than one process's
OPTIM = OptimConfig(name="adafactor", lr=1e-2, weight_decay=0.1, schedule="constant")

# (full shape, split dim or None): every case of the factored statistics
TENSORS = [((8, 6), 0), ((6, 8), 1), ((10,), 0), ((4, 6, 5), 0), ((3, 8, 5), 1),
           ((3, 5, 8), 2), ((6, 4), None), ((5,), None)]


def _state_dim(key: str, split: int | None, ndim: int) -> int | None:
    """The dim along which state ``key`` of a parameter split along ``split`` is sharded."""
    if split is None or key == "step":
        return None
    if key == "row_var":
        return split if split != ndim - 1 else None
    if key == "col_var":
        return split if split != ndim - 2 else None
    return split  # variance


def _gather(local: torch.Tensor, dim: int | None, group) -> tuple[torch.Tensor, bool]:
    """(the full tensor, whether a replicated one is bitwise the same on every rank)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    if dim is None:
        return local, all(torch.equal(p, local) for p in parts)
    return torch.cat(parts, dim=dim), True


def _compare_state(state: dict, ref_state: dict, split: int | None, ndim: int, group,
                   where: str) -> dict[str, float]:
    """Relative difference of each gathered state tensor from the reference's."""
    assert set(state) == set(ref_state), where
    out = {}
    for key, value in ref_state.items():
        full, same = _gather(state[key], _state_dim(key, split, ndim), group)
        assert same, f"{where} {key}: the replicated state differs between TP ranks"
        assert full.shape == value.shape, (where, key, full.shape, value.shape)
        out[f"{where}/{key}"] = relative_difference(full, value)
    return out


class _CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls while installed."""

    def __init__(self):
        self.calls = 0
        self.original = dist.all_reduce

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def _tensors(rank: int, world: int) -> dict:
    """Bare tensors: torch's Adafactor on the full ones vs ours on this rank's shards."""
    torch.manual_seed(0)
    full = [torch.randn(shape) for shape, _ in TENSORS]
    ref = [torch.nn.Parameter(t.clone()) for t in full]
    local = [torch.nn.Parameter((t if s is None else t.chunk(world, s)[rank]).clone())
             for t, (_, s) in zip(full, TENSORS, strict=True)]
    layout = TensorParallelLayout(dist.group.WORLD, {p: s for p, (_, s) in
                                                     zip(local, TENSORS, strict=True)
                                                     if s is not None})
    ref_opt = torch.optim.Adafactor(ref, lr=0.05, weight_decay=0.1)
    opt = Adafactor(local, lr=0.05, weight_decay=0.1, tp_layout=layout)
    calls = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for r, p, (shape, s) in zip(ref, local, TENSORS, strict=True):
            grad = torch.randn(shape, generator=gen) * (1e-5 if step == 0 else 1.0)
            r.grad = grad
            p.grad = (grad if s is None else grad.chunk(world, s)[rank]).clone()
        ref_opt.step()
        with _CountAllReduce() as count:
            opt.step()
        calls.append(count.calls)
    diffs = {}
    for i, (r, p, (shape, s)) in enumerate(zip(ref, local, TENSORS, strict=True)):
        gathered, same = _gather(p.detach(), s, dist.group.WORLD)
        assert same
        diffs[f"{i}/param"] = relative_difference(gathered, r.detach())
        diffs.update(_compare_state(opt.state[p], ref_opt.state[r], s, len(shape),
                                    dist.group.WORLD, str(i)))
    moved = relative_difference(local[0].detach(), full[0].chunk(world, 0)[rank])
    return {"diffs": diffs, "calls": calls, "moved": moved}


def _unsharded(rank: int) -> int:
    """all-reduce calls of a step under a two-rank layout that shards nothing (rank 1 takes
    no step at all: a collective would hang)."""
    param = torch.nn.Parameter(torch.ones(4, 3))
    opt = Adafactor([param], tp_layout=TensorParallelLayout(dist.group.WORLD, {}))
    with _CountAllReduce() as count:
        if rank == 0:
            param.grad = torch.full_like(param, 0.5)
            opt.step()
    dist.barrier()
    return count.calls


def _train(model, optimizer, group, batches, sequence_parallel: bool = False) -> list[float]:
    losses = []
    for batch in batches:
        labels, mask = labels_and_mask(batch)
        out = lm_loss(model(**batch), labels, mask, model.cfg.z_loss, tp_group=group)
        optimizer.zero_grad()
        out["loss"].backward()
        if sequence_parallel:
            reduce_sequence_parallel_grads(model, group)
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


def _model(rank: int, world: int, arch: str, use_zero1: bool = False,
           sequence_parallel: bool = False) -> dict:
    """TP2 model + build_optimizer's Adafactor vs the one-process model and optimizer. With
    four ranks, two data-parallel replicas see the same batches (their summed gradients
    would be twice the reference's) and ZeRO-1 shards the optimizer between them."""
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    reference = build_model(cfg)
    ctx = ParallelContext.build(tp=2, dp=world // 2, sequence_parallel=sequence_parallel)
    model = build_model(cfg, ctx=ctx)
    load_full_state_dict(model, reference.state_dict(), ctx.tp_group)
    batches = [tiny_batch(arch, seed) for seed in range(STEPS)]
    ref_opt = build_optimizer(OPTIM, reference)
    assert type(ref_opt) is Adafactor and ref_opt.tp_layout is None
    opt = build_optimizer(OPTIM, model)
    if use_zero1 and ctx.dp == 1:  # over a data-parallel group of one: still rebuilt
        singles = [dist.new_group([r]) for r in range(world)]
        opt = zero1(opt, singles[rank])
    elif use_zero1:
        opt = zero1(opt, ctx.dp_group)
    ref_losses = _train(reference, ref_opt, None, batches)
    losses = _train(model, opt, ctx.tp_group, batches, sequence_parallel)
    local_opt = opt.optim if use_zero1 else opt
    assert local_opt.tp_layout is not None and local_opt.tp_layout.group is ctx.tp_group
    final = gather_full_state_dict(model, ctx.tp_group)
    ref_params = dict(reference.named_parameters())
    diffs = {f"{n}/param": relative_difference(final[n], ref_params[n].detach())
             for n in ref_params}
    owned = [(n, p) for n, p in model.named_parameters() if p in local_opt.state]
    dims = partition_dims(model)
    for name, param in owned:  # ZeRO-1 over two replicas: this rank's share
        diffs.update(_compare_state(local_opt.state[param], ref_opt.state[ref_params[name]],
                                    dims[name], param.dim(), ctx.tp_group, name))
    return {"loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
            "diffs": diffs, "sharded": sum(dims[n] is not None for n, _ in owned),
            "owned": len(owned), "params": len(ref_params)}


def _check(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["loss"] <= TOL, (rank, result["loss"])
        worst = max(result["diffs"].items(), key=lambda kv: kv[1])
        assert worst[1] <= TOL, (rank, worst)
        assert result["sharded"] > 0


def _fast(rank: int, world: int) -> dict:
    return {"tensors": _tensors(rank, world), "unsharded_calls": _unsharded(rank),
            "models": [_model(rank, world, "causal_decoder"),
                       _model(rank, world, "causal_decoder", use_zero1=True)]}


def test_tp2_matches_single_process_tensors_and_causal_decoder():
    """One spawned job (process start-up dominates):

    - bare tensors split along rows, columns, a vector, the batch / row / column dim of 3-D
      tensors, and replicated ones: params and state = torch's on the full tensors, with
      three all-reduces a step, and none when nothing is sharded;
    - the causal decoder through build_optimizer, also under ZeRO-1 (which rebuilds the
      optimizer from its class): losses, gathered weights and Adafactor state after 4 steps.
    """
    results = spawn(2)(_fast)
    for result in results:
        tensors = result["tensors"]
        worst = max(tensors["diffs"].items(), key=lambda kv: kv[1])
        assert worst[1] <= TOL, worst
        assert tensors["moved"] > 1e-3  # the steps did something
        # float32 statistics and float64 sums of squares, then the update sums of squares
        assert tensors["calls"] == [3] * STEPS
    assert [r["unsharded_calls"] for r in results] == [0, 0]
    for per_rank in zip(*[r["models"] for r in results], strict=True):
        _check(list(per_rank))


def _slow(rank: int, world: int) -> list[dict]:
    return [*(_model(rank, world, arch) for arch in ARCHS if arch != "causal_decoder"),
            _model(rank, world, "encoder_decoder", sequence_parallel=True)]


@pytest.mark.slow
def test_tp2_other_archs_match_single_process():
    """The non-causal decoder and the encoder-decoder (also with sequence parallelism), as
    the causal decoder above."""
    results = spawn(2, timeout_s=300)(_slow)
    for per_rank in zip(*results, strict=True):
        _check(list(per_rank))
        assert all(r["owned"] == r["params"] for r in per_rank)


def _tp2_dp2(rank: int, world: int) -> dict:
    return _model(rank, world, "nonc_decoder", use_zero1=True)


@pytest.mark.slow
def test_tp2_dp2_zero1_matches_single_process():
    """Four ranks: TP2 x DP2 with ZeRO-1, each TP pair updating its share of the parameters
    (and the same share on both TP ranks: their reductions pair up)."""
    results = spawn(4, timeout_s=300)(_tp2_dp2)
    _check(results)
    assert results[0]["owned"] == results[1]["owned"] < results[0]["params"]
    assert results[0]["owned"] + results[2]["owned"] == results[0]["params"]
