"""Tensor parallelism on real gloo processes equals the single-process model.

Each rank builds the single-process model (same seed: identical on every rank) and a TP model
loaded from its weights sliced per rank, trains both with AdamW on the same batches and compares
the replicated loss at every step and the gathered gradients after the first.
"""

from __future__ import annotations

import pytest
import torch

from megarch.model import build_model, lm_loss
from megarch.parallel import (
    ParallelContext,
    clip_grad_norm,
    gather_full_state_dict,
    gather_grads,
    load_full_state_dict,
)
from megarch.parallel.reshard import split_tp_model
from megarch.parallel.spawn import spawn
from megarch.parallel.tensor_parallel import partition_dims, reduce_sequence_parallel_grads
from tests.parallel.helpers import (
    ARCHS,
    labels_and_mask,
    relative_difference,
    tiny_batch,
    tiny_config,
)

STEPS = 4


def _train(model, group, batches, sequence_parallel: bool = False
           ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of STEPS AdamW steps (clipped at norm 1) and the gradients of the first."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses, first_grads = [], {}
    for step, batch in enumerate(batches):
        labels, mask = labels_and_mask(batch)
        out = lm_loss(model(**batch), labels, mask, model.cfg.z_loss, tp_group=group)
        opt.zero_grad()
        out["loss"].backward()
        if sequence_parallel:
            reduce_sequence_parallel_grads(model, group)
        if step == 0:
            first_grads = gather_grads(model, group)
        clip_grad_norm(model, 1.0, group)
        opt.step()
        losses.append(out["loss"].item())
    return losses, first_grads


def _compare_tp(rank: int, world: int, arch: str, sequence_parallel: bool = False,
                kv_heads: int | None = None) -> dict:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    cfg.n_kv_heads = kv_heads
    reference = build_model(cfg)
    ctx = ParallelContext.build(tp=world, sequence_parallel=sequence_parallel)
    model = build_model(cfg, ctx=ctx)
    if kv_heads is None:
        load_full_state_dict(model, reference.state_dict(), ctx.tp_group)
    else:  # as a checkpoint reshard cuts it (megarch.parallel.reshard)
        model.load_state_dict(split_tp_model(reference.state_dict(), world,
                                             partition_dims(model))[rank])
    batches = [tiny_batch(arch, seed) for seed in range(STEPS)]
    ref_losses, ref_grads = _train(reference, None, batches)
    tp_losses, tp_grads = _train(model, ctx.tp_group, batches, sequence_parallel)
    final = gather_full_state_dict(model, ctx.tp_group)
    return {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(tp_losses, ref_losses, strict=True)),
        "grad": {n: relative_difference(tp_grads[n], g) for n, g in ref_grads.items()},
        "weights": max(relative_difference(final[n], w)
                       for n, w in reference.state_dict().items()),
        "local_vocab": model.embed.weight.shape[0],
    }


def _compare_all(rank: int, world: int) -> dict:
    out = {arch: _compare_tp(rank, world, arch) for arch in ARCHS}
    out.update({f"{arch}+sp": _compare_tp(rank, world, arch, True) for arch in ARCHS})
    return out


def test_tp2_matches_single_process_all_archs():
    """TP2 == TP1 for CD, ND and ED, without and with sequence parallelism: losses over 4 AdamW
    steps, every gathered gradient, the final weights."""
    results = spawn(2)(_compare_all)
    assert len(results[0]) == 6
    for rank, per_arch in enumerate(results):
        for arch, res in per_arch.items():
            assert res["local_vocab"] == 48
            assert res["loss"] <= 1e-5, (rank, arch, res["loss"])
            worst = max(res["grad"].items(), key=lambda kv: kv[1])
            assert worst[1] <= 1e-5, (rank, arch, worst)
            assert res["weights"] <= 1e-4, (rank, arch, res["weights"])


def _gqa_layouts(rank: int, world: int) -> dict:
    """GQA (4 query heads, 2 KV heads: one per rank) against one process, and this rank's KV
    rows and initial weights."""
    out = {arch: _compare_tp(rank, world, arch, kv_heads=2) for arch in ARCHS}
    out["causal_decoder+sp"] = _compare_tp(rank, world, "causal_decoder", True, kv_heads=2)
    cfg = tiny_config("encoder_decoder")
    cfg.n_kv_heads = 2
    single = build_model(cfg, seed=7)
    ctx = ParallelContext.build(tp=world)
    sharded = build_model(cfg, ctx=ctx, seed=7)
    head_dim, kv_per_rank = cfg.kv_dim, 2 // world
    rows = slice(rank * kv_per_rank * head_dim, (rank + 1) * kv_per_rank * head_dim)
    names = [n for n in single.state_dict() if n.endswith((".k.weight", ".v.weight"))]
    out["kv_rows"] = all(torch.equal(sharded.get_parameter(n), single.get_parameter(n)[rows])
                         for n in names) and len(names) == 12  # 2 + 2 self, 2 cross
    gathered = gather_full_state_dict(sharded, ctx.tp_group)
    out["init"] = all(torch.equal(gathered[n], w) for n, w in single.state_dict().items())
    return out


def test_tp2_gqa_matches_single_process():
    """Grouped-query attention at TP2: each rank holds its query heads and their KV head
    (rows ``[r * KV/tp, (r + 1) * KV/tp)`` of k and v, loaded through the checkpoint reshard's
    split); losses, gathered gradients and final weights equal one process for CD, ND, ED
    (cross-attention) and CD with sequence parallelism; the same seed initialises the same
    weights at TP1 and TP2."""
    results = spawn(2)(_gqa_layouts)
    for rank, per_arch in enumerate(results):
        assert per_arch.pop("kv_rows") and per_arch.pop("init"), rank
        assert len(per_arch) == 4
        for arch, res in per_arch.items():
            assert res["loss"] <= 1e-5, (rank, arch, res["loss"])
            worst = max(res["grad"].items(), key=lambda kv: kv[1])
            assert worst[1] <= 1e-5, (rank, arch, worst)
            assert res["weights"] <= 1e-4, (rank, arch, res["weights"])


def _failing(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    torch.distributed.barrier()  # rank 0 waits on the dead rank


def test_spawn_names_the_failing_rank():
    from megarch.parallel.spawn import SpawnError

    with pytest.raises(SpawnError, match="rank 1 of 2 failed(.|\n)*boom on purpose"):
        spawn(2, timeout_s=30)(_failing)
