"""Overlapped data-parallel gradient reduction (megarch.parallel.grad_reduce) on real gloo
processes gives bitwise the gradients of the post-backward bucketed all-reduce
(megarch.parallel.data_parallel.all_reduce_grads) over a data-parallel group of two ranks: with
accumulation over micro-batches, with ZeRO-1 (reduced to each parameter's owner; the norm and
the updated weights bitwise too), with tensor parallelism (sequence parallelism's deferred norm
gradients) and with pipeline stages (1F1B and interleaved, tied embedding copies). Buckets are
launched during the last micro-batch's backward, never before it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from megarch.model import build_model, build_stage, lm_loss
from megarch.parallel.context import ParallelContext
from megarch.parallel.data_parallel import all_reduce_grads, sum_over, zero1
from megarch.parallel.grad_reduce import GradReducer, zero1_owners
from megarch.parallel.pipeline import interleaved_one_f_one_b, one_f_one_b
from megarch.parallel.spawn import spawn
from megarch.parallel.tensor_parallel import (
    clip_grad_norm,
    partition_dims,
    reduce_sequence_parallel_grads,
    shard_tensor,
)
from tests.parallel.helpers import labels_and_mask, tiny_batch, tiny_config

MICRO = 3
SMALL_MB = 2e-3
"""A bucket of 524 float32 elements: the tiny model's gradients fill many buckets."""


def _micro_batches(arch: str, ctx: ParallelContext, n: int) -> list[dict]:
    """Different data per data-parallel rank, the same on the ranks of one replica."""
    return [tiny_batch(arch, 100 * ctx.dp_rank + i, batch=2) for i in range(n)]


def _backward(model, batches: list[dict], group, reducer: GradReducer | None = None,
              observe: list | None = None) -> None:
    """The loop's accumulation: every micro-batch's loss divided by the global token count."""
    tokens = sum_over([float(sum(labels_and_mask(b)[1].sum() for b in batches))], group)[0]
    for i, batch in enumerate(batches):
        labels, mask = labels_and_mask(batch)
        out = lm_loss(model(**batch), labels, mask, model.cfg.z_loss, num_tokens=tokens,
                      tp_group=model.tp_group)
        out["loss"].backward()
        if observe is not None and i < len(batches) - 1:
            observe.append(reducer._next)  # buckets launched before the last micro-batch


def _pipeline_backward(stage, batches: list[dict], group) -> None:
    tokens = sum_over([float(sum(labels_and_mask(b)[1].sum() for b in batches))], group)[0]

    def loss_fn(logits, mb):
        labels, mask = labels_and_mask(mb)
        return lm_loss(logits, labels, mask, stage.cfg.z_loss, num_tokens=tokens,
                       tp_group=stage.tp_group)

    schedule = interleaved_one_f_one_b if stage.virtual_stages > 1 else one_f_one_b
    schedule(stage, batches, loss_fn)


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _dp(rank: int, world: int, arch: str, reduce_dtype) -> dict:
    """DP2: today's post-backward reduction vs the overlapped one, small and whole-model
    buckets; and the local (unreduced) gradients for the bf16 reference."""
    ctx = ParallelContext.build()
    torch.manual_seed(0)
    today = build_model(tiny_config(arch))
    batches = _micro_batches(arch, ctx, MICRO)
    _backward(today, batches, ctx.dp_group)
    local = _grads(today)
    all_reduce_grads(today, ctx.dp_group, SMALL_MB)
    out = {"today": _grads(today), "local": local}
    for mb in (SMALL_MB, 25.0):
        model = copy.deepcopy(today)
        model.zero_grad(set_to_none=True)
        reducer = GradReducer(model, ctx.dp_group, mb, reduce_dtype)
        for _ in range(2):  # twice: the buckets are reused from step to step
            model.zero_grad(set_to_none=True)
            reducer.start(MICRO)
            early: list[int] = []
            _backward(model, batches, ctx.dp_group, reducer, early)
            launched = reducer.launched_early
            reducer.finish()
        out[mb] = {"grads": _grads(model), "early": early, "launched": launched,
                   "buckets": len(reducer.buckets)}
    return out


@pytest.mark.parametrize("arch", ["encoder_decoder", "causal_decoder"])
def test_overlapped_dp2_with_accumulation_equals_post_backward_bitwise(arch):
    for rank, out in enumerate(spawn(2)(_dp, arch, None)):
        today = out["today"]
        assert any(g.abs().max() > 0 for g in today.values())
        for mb in (SMALL_MB, 25.0):
            got = out[mb]
            for name, grad in got["grads"].items():
                assert torch.equal(grad, today[name]), (rank, mb, name)
            assert got["early"] == [0] * (MICRO - 1)  # nothing before the last micro-batch
            assert got["launched"] >= 1  # during the last backward
        assert out[SMALL_MB]["buckets"] > out[25.0]["buckets"] == 1
        assert out[SMALL_MB]["launched"] > 1


def test_bf16_reduction_sums_bfloat16_copies_and_keeps_float32_grads():
    results = spawn(2)(_dp, "causal_decoder", torch.bfloat16)
    for out in results:
        for mb in (SMALL_MB, 25.0):
            for name, grad in out[mb]["grads"].items():
                a, b = (results[r]["local"][name].to(torch.bfloat16) for r in range(2))
                assert grad.dtype == torch.float32
                assert torch.equal(grad, (a + b).float()), (mb, name)
        deviation = max((out[25.0]["grads"][n] - g).abs().max() / g.abs().max()
                        for n, g in out["today"].items() if g.abs().max() > 0)
        assert 0 < deviation < 2**-7  # bfloat16's rounding, not more


def _zero(rank: int, world: int, arch: str) -> dict:
    """ZeRO-1 over DP2: all-reduce + ZeroRedundancyOptimizer as today vs reduce-to-owner,
    norm, clip and step; AdamW so that every parameter's update depends on its gradient."""
    ctx = ParallelContext.build()
    torch.manual_seed(0)
    today = build_model(tiny_config(arch))
    model = copy.deepcopy(today)
    opts = [zero1(torch.optim.AdamW(m.parameters(), lr=1e-2), ctx.dp_group)
            for m in (today, model)]
    batches = _micro_batches(arch, ctx, MICRO)
    reducer = GradReducer(model, ctx.dp_group, SMALL_MB, owner=zero1_owners(opts[1]))
    out = {"norms": [], "owned": [], "equal_grads": [], "moved": 0.0}
    for _ in range(2):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        _backward(today, batches, ctx.dp_group)
        all_reduce_grads(today, ctx.dp_group, SMALL_MB)
        norm_today = torch.nn.utils.get_total_norm([p.grad for p in today.parameters()]).item()
        torch.nn.utils.clip_grads_with_norm_(list(today.parameters()), 0.05,
                                             torch.tensor(norm_today))
        reducer.start(MICRO)
        _backward(model, batches, ctx.dp_group)
        reducer.finish()
        norm = reducer.grad_norm(False)
        reducer.clip(0.05, norm, False)
        owned = {n for n, p in model.named_parameters() if p.grad is not None}
        out["equal_grads"].append(all(torch.equal(p.grad, dict(today.named_parameters())[n].grad)
                                      for n, p in model.named_parameters() if n in owned))
        out["owned"].append(sorted(owned))
        out["norms"].append((norm_today, norm))
        before = [p.detach().clone() for p in today.parameters()]
        for opt in opts:
            opt.step()
        out["moved"] = max(out["moved"], max((p - q).abs().max().item()
                                             for p, q in zip(today.parameters(), before,
                                                             strict=True)))
    out["equal_params"] = all(torch.equal(p, q) for p, q in zip(today.parameters(),
                                                               model.parameters(), strict=True))
    out["n_params"] = len(list(model.parameters()))
    out["type"] = type(opts[1]).__name__
    return out


def test_zero1_reduce_to_owner_equals_all_reduce_then_zero_bitwise():
    results = spawn(2)(_zero, "nonc_decoder")
    owned = [set(r["owned"][0]) for r in results]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert len(owned[0] | owned[1]) == results[0]["n_params"]  # each gradient on one owner
    for out in results:
        assert out["type"] == "ZeroRedundancyOptimizer"  # state dict and resume as before
        assert all(out["equal_grads"])
        for today, norm in out["norms"]:
            assert norm == today and norm > 0.05  # bitwise, and clipping was active
        assert out["moved"] > 0 and out["equal_params"]  # the updated weights bitwise


def _model_parallel(rank: int, world: int, layout: str) -> dict:
    """Four ranks, DP2 x (TP2 with sequence parallelism | PP2 1F1B | PP2 interleaved): every
    gradient bitwise, and the ZeRO-1 norm bitwise the unsharded loop's."""
    cfg = tiny_config("causal_decoder")
    if layout == "tp2":
        ctx = ParallelContext.build(tp=2, sequence_parallel=True)
        torch.manual_seed(0)
        full = build_model(cfg).state_dict()

        def make():
            model = build_model(cfg, ctx=ctx)
            dims = partition_dims(model)
            model.load_state_dict({n: shard_tensor(full[n], dims[n], ctx.tp_rank, 2)
                                   for n in model.state_dict()})
            return model
    else:
        cfg.n_layers = 4
        ctx = ParallelContext.build(pp=2)
        virtual = 2 if layout == "pp2_interleaved" else 1

        def make():
            torch.manual_seed(0)
            return build_stage(cfg, ctx, virtual_stages=virtual)
    batches = _micro_batches("causal_decoder", ctx, 2)
    skip = frozenset()
    results = {}
    for mode in ("today", "overlap", "zero"):
        model = make()
        if layout != "tp2":
            skip = model.duplicated_parameters
        owner = None
        if mode == "zero":
            owner = zero1_owners(ZeroRedundancyOptimizer(list(model.parameters()),
                                                         torch.optim.SGD,
                                                         process_group=ctx.dp_group, lr=0.1))
        deferred = set()
        if layout == "tp2":  # the replicated norm weights: summed over TP first
            deferred = {n for n, dim in partition_dims(model).items() if dim is None}
        elif model.embed_group is not None:
            deferred = {"embed.weight"}
        reducer = None
        if mode != "today":
            reducer = GradReducer(model, ctx.dp_group, SMALL_MB, owner=owner, deferred=deferred)
            reducer.start(len(batches))
        if layout == "tp2":
            _backward(model, batches, ctx.dp_group)
            reduce_sequence_parallel_grads(model, model.tp_group)
        else:
            _pipeline_backward(model, batches, ctx.dp_group)
        if reducer is None:
            all_reduce_grads(model, ctx.dp_group, SMALL_MB)
            norm = clip_grad_norm(model, 0.0, model.tp_group, ctx.pp_group, skip)
        else:
            reducer.finish()
            norm = (reducer.grad_norm(True, model.tp_group, ctx.pp_group, skip)
                    if mode == "zero" else None)
        results[mode] = {"grads": _grads(model), "norm": norm, "deferred": len(deferred),
                         "launched": reducer.launched_early if reducer else 0}
    return results


@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_interleaved"])
def test_overlapped_equals_post_backward_under_tp_and_pp(layout):
    for rank, out in enumerate(spawn(4, timeout_s=180)(_model_parallel, layout)):
        today = out["today"]["grads"]
        assert all(g is not None for g in today.values())
        for name, grad in out["overlap"]["grads"].items():
            assert torch.equal(grad, today[name]), (rank, name)
        owned = {n for n, g in out["zero"]["grads"].items() if g is not None}
        assert owned and owned != set(today)
        for name in owned:
            assert torch.equal(out["zero"]["grads"][name], today[name]), (rank, name)
        assert out["zero"]["norm"] == out["today"]["norm"] > 0
        assert out["overlap"]["launched"] >= 1
        if layout == "tp2":
            assert out["overlap"]["deferred"] > 0


def test_reducer_refuses_bad_arguments():
    with pytest.raises(ValueError, match="bucket_mb=0"):
        GradReducer(torch.nn.Linear(2, 2), None, bucket_mb=0)
    with pytest.raises(ValueError, match="reduce_dtype=torch.float16"):
        GradReducer(torch.nn.Linear(2, 2), None, reduce_dtype=torch.float16)


def test_config_refuses_an_unknown_reduce_dtype():
    from megarch.config.train import ConfigError, ParallelConfig

    with pytest.raises(ConfigError, match="parallel.grad_reduce_dtype='fp16'"):
        ParallelConfig(grad_reduce_dtype="fp16").validate()
    with pytest.raises(ConfigError, match="overlap_grad_reduce true"):
        ParallelConfig(grad_reduce_dtype="bf16", overlap_grad_reduce=False).validate()


def _trainers(rank: int, world: int, embedded, root: str) -> dict:
    """DP2 Trainers of 3 steps (2 micro-batches each, clipping on): overlapped vs the
    post-backward reduction, with and without ZeRO-1; and one with bf16 reduction."""
    import os

    from megarch.training import Trainer
    from tests.training.helpers import fast_config

    torch.set_num_threads(1)
    out = {}
    for name, extra in (("post", {"parallel__overlap_grad_reduce": "false"}),
                        ("overlap", {}),
                        ("zero_post", {"parallel__overlap_grad_reduce": "false",
                                       "parallel__zero1": "true"}),
                        ("zero_overlap", {"parallel__zero1": "true"}),
                        ("bf16", {"parallel__grad_reduce_dtype": "bf16"})):
        cfg = fast_config("cd_flm_tiny", embedded, os.path.join(root, name), 3,
                          run__resume="none", run__save_every="0", run__micro_batch="2",
                          optim__clip_grad="0.05", parallel__grad_bucket_mb="0.01", **extra)
        trainer = Trainer(cfg)
        trainer.train()
        out[name] = {"params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                     "reducer": type(trainer.grad_reducer).__name__,
                     "launched": getattr(trainer.grad_reducer, "launched_early", 0)}
    return out


def test_trainer_overlapped_equals_post_backward_bitwise(embedded, tmp_path):
    from megarch.training import read_metrics

    results = spawn(2, timeout_s=240)(_trainers, embedded, str(tmp_path))
    curves = {name: [(r["loss"], r["grad_norm"]) for r in read_metrics(str(tmp_path / name))]
              for name in ("post", "overlap", "zero_post", "zero_overlap", "bf16")}
    assert len(curves["post"]) == 3
    assert curves["overlap"] == curves["post"]  # losses and pre-clip norms, exactly
    assert curves["zero_overlap"] == curves["zero_post"]
    assert all(norm > 0.05 for _, norm in curves["post"])  # clipping was active
    for out in results:
        assert out["post"]["reducer"] == "NoneType" and out["overlap"]["reducer"] == "GradReducer"
        assert out["overlap"]["launched"] > 1
        for a, b in (("overlap", "post"), ("zero_overlap", "zero_post")):
            for key, value in out[a]["params"].items():
                assert torch.equal(value, out[b]["params"][key]), (a, key)
        worst = max((out["bf16"]["params"][k] - v).abs().max() for k, v in
                    out["post"]["params"].items())
        assert 0 < worst < 1e-2  # bfloat16 sums: close, not equal
    assert all(torch.equal(v, results[1]["overlap"]["params"][k])
               for k, v in results[0]["overlap"]["params"].items())  # replicas agree


def _model_parallel_trainers(rank: int, world: int, embedded, root: str, layout: dict) -> dict:
    """Four ranks, DP2 x (TP2 with sequence parallelism | PP2): the Trainer's overlapped
    reduction (build_grad_reducer's deferred gradients) vs the post-backward one, ZeRO-1."""
    import os

    from megarch.training import Trainer
    from tests.training.helpers import fast_config

    torch.set_num_threads(1)
    out = {}
    for name, extra in (("post", {"parallel__overlap_grad_reduce": "false"}), ("overlap", {})):
        cfg = fast_config("cd_flm_tiny", embedded, os.path.join(root, name), 2,
                          run__resume="none", run__save_every="0", run__micro_batch="2",
                          run__global_batch="8", optim__clip_grad="0.05",
                          parallel__zero1="true", **layout, **extra)
        trainer = Trainer(cfg)
        trainer.train()
        out[name] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        out[name + "_deferred"] = len(getattr(trainer.grad_reducer, "deferred", ()))
    return out


@pytest.mark.parametrize("layout", [{"parallel__tp": "2", "parallel__sequence_parallel": "true"},
                                    {"parallel__pp": "2"}], ids=["tp2_sp", "pp2"])
def test_trainer_overlapped_equals_post_backward_under_tp_and_pp(embedded, tmp_path, layout):
    results = spawn(4, timeout_s=300)(_model_parallel_trainers, embedded, str(tmp_path), layout)
    for rank, out in enumerate(results):
        for key, value in out["overlap"].items():
            assert torch.equal(value, out["post"][key]), (rank, key)
    if "parallel__tp" in layout:
        assert all(out["overlap_deferred"] > 0 for out in results)  # the replicated norms
    else:
        assert any(out["overlap_deferred"] == 1 for out in results)  # the embedding copies
