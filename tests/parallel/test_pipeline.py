"""Pipeline parallelism (own 1F1B over gloo p2p) equals the single-process decoder.

Each rank builds the single-process model (same seed), loads its stage from it by name, and
both train with AdamW on the same batches split in micro-batches; the last stage's loss and
every stage's gradients (tied embedding summed over first and last stage) are compared, and the
global gradient norm (reduced over TP and pipeline groups) clips as in one process.
"""

from __future__ import annotations

import pytest
import torch

from megarch.model import build_model, lm_loss
from megarch.parallel import ParallelContext, clip_grad_norm
from megarch.parallel.pipeline import build_stage, one_f_one_b, stage_layers
from megarch.parallel.spawn import spawn
from tests.parallel.helpers import relative_difference, tiny_batch, tiny_config

STEPS, MICRO = 3, 4


def _split(batch: dict, parts: int) -> list[dict]:
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def _reference_step(model, batch: dict, opt) -> float:
    out = lm_loss(model(**batch), batch["labels"], batch["loss_mask"], model.cfg.z_loss)
    opt.zero_grad()
    out["loss"].backward()
    return out["loss"].item()


def _pipeline_step(stage, batch: dict, opt, tp_group) -> float:
    micro = _split(batch, MICRO)
    tokens = batch["loss_mask"].sum()

    def loss_fn(logits, mb):
        return lm_loss(logits, mb["labels"], mb["loss_mask"], stage.cfg.z_loss,
                       num_tokens=tokens, tp_group=tp_group)

    opt.zero_grad()
    results = one_f_one_b(stage, micro, loss_fn)
    return sum(r["loss"].item() for r in results)


def _compare(rank: int, world: int, arch: str, tp: int) -> dict:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    cfg.n_layers = 3  # uneven split: 2 + 1
    reference = build_model(cfg)
    ctx = ParallelContext.build(tp=tp, pp=world // tp)
    stage = build_stage(cfg, ctx)
    initial_embed = stage.embed.weight.sum().item()  # the tied copies start equal
    from megarch.parallel.tensor_parallel import shard_tensor

    full = reference.state_dict()
    stage.load_state_dict({n: shard_tensor(full[n], n, ctx.tp_rank, tp)
                           for n in stage.state_dict()})
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    ref_losses, losses, grads, norms = [], [], {}, []
    for step in range(STEPS):
        batch = tiny_batch(arch, step, batch=8)
        ref_losses.append(_reference_step(reference, batch, ref_opt))
        losses.append(_pipeline_step(stage, batch, opt, stage.tp_group))
        if step == 0:
            ref_grads = {n: p.grad for n, p in reference.named_parameters()}
            grads = {n: relative_difference(
                p.grad, shard_tensor(ref_grads[n], n, ctx.tp_rank, tp))
                for n, p in stage.named_parameters()}
        norms.append((clip_grad_norm(reference, 0.5, None),
                      clip_grad_norm(stage, 0.5, stage.tp_group, ctx.pp_group,
                                     stage.duplicated_parameters)))
        ref_opt.step()
        opt.step()
    return {"embed0": initial_embed, "last": ctx.is_last_stage, "losses": losses,
            "norms": norms, "ref": ref_losses, "grads": grads,
            "layers": list(stage_layers(cfg.n_layers, ctx.pp, ctx.pp_rank))}


def _check(results: list[dict]) -> None:
    for res in results:
        for ref_norm, norm in res["norms"]:  # clipped (all > 0.5) and equal across layouts
            assert ref_norm > 0.5 and abs(norm - ref_norm) <= 1e-5 * ref_norm
        worst = max(res["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-5, worst
        if res["last"]:
            diff = max(abs(a - b) / abs(b) for a, b in zip(res["losses"], res["ref"],
                                                          strict=True))
            assert diff <= 1e-5, (res["losses"], res["ref"])


@pytest.mark.parametrize("arch", ["causal_decoder", "nonc_decoder"])
def test_pp2_1f1b_matches_single_process(arch):
    results = spawn(2)(_compare, arch, 1)
    assert [r["layers"] for r in results] == [[0, 1], [2]]
    assert results[0]["embed0"] == results[1]["embed0"]
    assert "embed.weight" in results[0]["grads"] and "embed.weight" in results[1]["grads"]
    _check(results)


@pytest.mark.slow
def test_tp2_pp2_matches_single_process():
    results = spawn(4, timeout_s=240)(_compare, "causal_decoder", 2)
    _check(results)
