"""Dropout under tensor parallelism (megarch.parallel.rng) on real gloo processes.

Where activations are replicated over the TP ranks the ranks drop the same units; where they
are split (attention heads, feed-forward hidden units, the sequence chunks of sequence
parallelism) each TP rank draws its own masks, and each DP rank its own. Activation
checkpointing recomputes the same masks. With one process nothing changed: the model draws what
it drew before (values recorded from the code before megarch.parallel.rng existed).
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megarch.model import build_model, lm_loss
from megarch.parallel import ParallelContext
from megarch.parallel.rng import TensorParallelDropout, dropout_seed, rank_seed, split_dropout
from megarch.parallel.spawn import spawn
from megarch.training import Trainer
from tests.parallel.helpers import (
    ARCHS,
    labels_and_mask,
    relative_difference,
    tiny_batch,
    tiny_config,
)
from tests.training.helpers import fast_config

P = 0.1
attention_module = importlib.import_module("megarch.model.attention")  # the package's
# ``attention`` attribute is the function of that name

# TP1 logits of tiny_config(arch) with dropout 0.1 in training mode (weights from seed 0, then
# seed 1, batch tiny_batch(arch, 0)), recorded at commit da492dc, before this module existed:
# (sum, sum of |logits|, logits[0, 1, :3]).
TP1_RECORDED = {
    "causal_decoder": (267.5732162856184, 3975.069243397793,
                       (-0.3566259443759918, -0.1746072769165039, 1.0787912607192993)),
    "nonc_decoder": (282.3530424286473, 3982.1871551400654,
                     (0.0777423083782196, -0.3440246880054474, 0.6539413332939148)),
    "encoder_decoder": (156.99738172854995, 3917.0945390792913,
                        (1.363912582397461, -0.5658695697784424, 0.734490692615509)),
}


def _dropout_config(arch: str, checkpointing: bool = False):
    return dataclasses.replace(tiny_config(arch), dropout=P,
                               activation_checkpointing=checkpointing)


# ---- one process: the old path ----------------------------------------------------------------

@torch.no_grad()
def _recorded_weights(model: torch.nn.Module) -> None:
    """The weights the values above were recorded with: the global-RNG initialisation that the
    per-parameter generators replaced (module order, T5X's scales), redone here so the test
    still checks the dropout masks against the recording."""
    from megarch.model.layers import RMSNorm
    from megarch.model.position import RelativePositionBias

    std = model.cfg.init_std
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            scale = std / module.in_features**0.5
            torch.nn.init.trunc_normal_(module.weight, std=scale, a=-2 * scale, b=2 * scale)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)
        elif isinstance(module, RelativePositionBias):
            buckets, heads = module.table.shape
            torch.nn.init.normal_(module.table, std=std * (2.0 / (buckets + heads)) ** 0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp1_model_draws_what_it_drew_before(arch):
    model = build_model(_dropout_config(arch)).train()
    torch.manual_seed(0)
    _recorded_weights(model)
    torch.manual_seed(1)
    logits = model(**tiny_batch(arch, 0)).double()
    total, absolute, first = TP1_RECORDED[arch]
    assert logits.sum().item() == pytest.approx(total, rel=1e-5)
    assert logits.abs().sum().item() == pytest.approx(absolute, rel=1e-6)
    assert logits[0, 1, :3].tolist() == pytest.approx(first, rel=1e-5, abs=1e-6)
    assert model.eval()(**tiny_batch(arch, 0)).abs().sum().item() != pytest.approx(absolute)


def test_tp1_dropout_is_plain_functional_dropout():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(4)
    expected = F.dropout(x, P, training=True)
    for dropout in (TensorParallelDropout(P, None, split=True), TensorParallelDropout(P),
                    lambda t: split_dropout(t, P, None)):
        torch.manual_seed(4)
        assert torch.equal(dropout(x), expected)
    module = TensorParallelDropout(P, None, split=True).eval()
    assert torch.equal(module(x), x)


def test_rank_seed_is_splitmix64_and_separates_low_bits():
    # SplitMix64 seeded with 0 outputs 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4,
    # 0x06c45d188009454f (its published sequence); rank r's seed is output r + 1 >> 1.
    published = (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F)
    assert [rank_seed(0, rank) for rank in range(3)] == [v >> 1 for v in published]
    seeds = [rank_seed(2**61 + 7, rank) for rank in range(16)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len({s & 0xFFFFFFFF for s in seeds}) == 16  # a CPU generator keeps only these


def test_dropout_seed_keeps_the_data_parallel_streams():
    """One stream per (DP rank, stage), the DP streams as before; TP ranks share theirs."""
    seeds = {(tp, dp, pp): dropout_seed(7, ParallelContext(tp=2, dp=2, pp=2,
                                                           rank=pp * 4 + dp * 2 + tp))
             for tp in range(2) for dp in range(2) for pp in range(2)}
    assert seeds[(0, 0, 0)] == seeds[(1, 0, 0)] == 7
    assert seeds[(0, 1, 0)] == seeds[(1, 1, 0)] == 7 + 1_000_003
    assert seeds[(0, 0, 1)] == 7 + 2 * 1_000_003 and seeds[(1, 1, 1)] == 7 + 3 * 1_000_003


# ---- TP2: masks and checkpointing --------------------------------------------------------------

def _capture_masks(model, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per dropout site, from its first call: (dropped units, units with a nonzero input, max
    error of the kept units against input / (1 - p))."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep_first(name):
        def hook(module, args, out) -> None:  # returns None: the output is unchanged
            seen.setdefault(name, (args[0].detach(), out.detach()))
        return hook

    hooks = [model.dropout.register_forward_hook(keep_first("embedding")),
             model.blocks[0].dropout.register_forward_hook(keep_first("residual")),
             model.blocks[0].ff.dropout.register_forward_hook(keep_first("hidden"))]
    real = attention_module.split_dropout

    def recording(x, p, group, training=True):  # test-only: the probabilities' dropout
        out = real(x, p, group, training)
        seen.setdefault("attention", (x.detach(), out.detach()))
        return out

    attention_module.split_dropout = recording
    try:
        model(**batch)
    finally:
        attention_module.split_dropout = real
        for hook in hooks:
            hook.remove()
    masks = {}
    for name, (x, out) in seen.items():
        valid = x != 0
        dropped = (out == 0) & valid
        kept = valid & ~dropped
        error = (out[kept] - x[kept] / (1 - P)).abs().max().item()
        masks[name] = (dropped, valid, error)
    return masks


def _gradients(ctx, arch: str, checkpointing: bool, seed: int) -> dict[str, torch.Tensor]:
    """This rank's gradients of one forward/backward with dropout, weights from tp_rank."""
    cfg = _dropout_config(arch, checkpointing)
    torch.manual_seed(ctx.tp_rank)
    model = build_model(cfg, ctx=ctx).train()
    torch.manual_seed(dropout_seed(seed, ctx))
    batch = tiny_batch(arch, 0)
    labels, mask = labels_and_mask(batch)
    lm_loss(model(**batch), labels, mask, cfg.z_loss, tp_group=ctx.tp_group)["loss"].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _tp2_masks(rank: int, world: int, simulate_dp: bool) -> dict:
    """This TP rank's masks per (DP rank, sequence parallelism) and, with ``simulate_dp``, the
    checkpointing gradients. ``simulate_dp``: 2 processes (TP2) draw the masks of DP ranks 0
    and 1 by seeding as each would (a DP rank enters dropout only through
    :func:`dropout_seed`); otherwise 4 processes (TP2 x DP2) each draw their own."""
    base = ParallelContext.build(tp=2, dp=world // 2)
    dp_ranks = (0, 1) if simulate_dp else (base.dp_rank,)
    out: dict = {"tp": base.tp_rank, "masks": {}}
    for sp in (False, True):
        ctx = dataclasses.replace(base, sequence_parallel=sp)
        torch.manual_seed(ctx.tp_rank)  # the same weights on every DP rank
        model = build_model(_dropout_config("causal_decoder"), ctx=ctx).train()
        assert model.sequence_parallel == sp
        for dp in dp_ranks:
            as_dp = dataclasses.replace(ctx, dp=2, rank=ctx.tp_rank + 2 * dp)  # seeding only
            torch.manual_seed(dropout_seed(0, as_dp))
            out["masks"][dp, sp] = _capture_masks(model, tiny_batch("causal_decoder", 0))
    if not simulate_dp:
        return out
    for arch in ("causal_decoder", "encoder_decoder"):
        ctx = dataclasses.replace(base, sequence_parallel=True)
        plain = _gradients(ctx, arch, False, seed=0)
        recomputed = _gradients(ctx, arch, True, seed=0)
        other_seed = _gradients(ctx, arch, False, seed=1)
        out[arch] = {
            "checkpointing": max(relative_difference(recomputed[n], g) for n, g in plain.items()),
            "other_seed": max(relative_difference(other_seed[n], g) for n, g in plain.items()),
        }
    try:
        split_dropout(torch.ones(4), 1.0, base.tp_group)
    except ValueError as err:
        out["bad_p"] = str(err)
    return out


def _by_tp_dp(results: list[dict]) -> dict:
    """{(tp_rank, dp_rank, sequence_parallel): masks} over the ranks' results."""
    return {(r["tp"], dp, sp): masks for r in results for (dp, sp), masks in r["masks"].items()}


@pytest.fixture(scope="module")
def tp2(embedded, tmp_path_factory) -> list[dict]:
    """The two TP ranks' results (DP ranks simulated by their seeds), the Trainer run's under
    "trainer" (one spawned job for both)."""
    out_dir = str(tmp_path_factory.mktemp("dropout_tp2") / "trainer")
    return spawn(2, timeout_s=240)(_tp2_job, embedded, out_dir)


def _tp2_job(rank: int, world: int, embedded, out_dir: str) -> dict:
    return {**_tp2_masks(rank, world, True), "trainer": _train_tp2(rank, world, embedded,
                                                                   out_dir)}


def _differ(a, b) -> bool:
    """Masks a, b (dropped, valid, _) differ on the units valid in both."""
    both = a[1] & b[1]
    assert both.sum() > 100
    return bool((a[0] != b[0])[both].any())


SITES = ("embedding", "residual", "hidden", "attention")


def _check_masks(masks: dict) -> None:
    for dp in range(2):
        off0, off1 = masks[0, dp, False], masks[1, dp, False]
        for site in ("embedding", "residual"):  # replicated without sequence parallelism
            assert torch.equal(off0[site][0], off1[site][0]), (dp, site)
        for site in ("hidden", "attention"):  # heads / hidden units split
            assert _differ(off0[site], off1[site]), (dp, site)
        on0, on1 = masks[0, dp, True], masks[1, dp, True]
        for site in SITES:  # all split under sequence parallelism
            assert _differ(on0[site], on1[site]), (dp, site)
    for tp in range(2):
        for sp in (False, True):
            for site in SITES:
                assert _differ(masks[tp, 0, sp][site], masks[tp, 1, sp][site]), (tp, sp, site)
    for key, per_site in masks.items():
        dropped = torch.cat([m[0][m[1]] for m in per_site.values()])
        assert 0.07 < dropped.float().mean().item() < 0.13, key
        assert max(m[2] for m in per_site.values()) < 1e-5  # kept units scaled by 1/(1-p)


def test_masks_agree_where_replicated_and_differ_where_split(tp2):
    """Across TP ranks: replicated masks identical, split ones different; across DP ranks all
    different; p of the units dropped, the others scaled by 1/(1-p)."""
    masks = _by_tp_dp(tp2)
    assert len(masks) == 8
    _check_masks(masks)
    assert "dropout probability 1.0" in tp2[0]["bad_p"]


@pytest.mark.slow
def test_masks_on_real_tp2_dp2_processes():
    """The same checks with 4 processes, each DP rank seeded by itself."""
    masks = _by_tp_dp(spawn(4, timeout_s=300)(_tp2_masks, False))
    assert len(masks) == 8
    _check_masks(masks)


def test_activation_checkpointing_recomputes_the_masks(tp2):
    """TP2 + SP gradients with activation checkpointing equal those without (same seed); a
    different seed changes them, so the masks matter."""
    for result in tp2:
        for arch in ("causal_decoder", "encoder_decoder"):
            assert result[arch]["checkpointing"] <= 1e-6, (arch, result[arch])
            assert result[arch]["other_seed"] > 1e-2, (arch, result[arch])


def _cuda_split_dropout(rank: int, world: int) -> dict:
    group = torch.distributed.group.WORLD  # a TP group of 2 (gloo: ranks only, no collective)
    torch.manual_seed(0)
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside raises
    try:
        out = split_dropout(x, P, group)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def layer(t):
        return split_dropout(t * 2.0, P, group).sin()

    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(1)
        y = checkpoint(layer, x, use_reentrant=False) if checkpointing else layer(x)
        x.grad = None
        y.square().sum().backward()
        grads.append(x.grad.clone())
    return {"dropped": (out == 0).cpu(), "device": out.device.type,
            "recomputed": torch.equal(grads[0], grads[1])}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_dropout_on_cuda_needs_no_sync_and_recomputes():
    ranks = spawn(2, timeout_s=180)(_cuda_split_dropout)
    assert all(r["device"] == "cuda" and r["recomputed"] for r in ranks)
    assert not torch.equal(ranks[0]["dropped"], ranks[1]["dropped"])
    assert 0.08 < ranks[0]["dropped"].float().mean().item() < 0.12


# ---- a TP2 Trainer with dropout ---------------------------------------------------------------

STEPS = 4


def _train_tp2(rank: int, world: int, embedded, out_dir: str) -> dict:
    torch.set_num_threads(1)
    cfg = fast_config("cd_flm_tiny", embedded, out_dir, STEPS, parallel__tp="2",
                      model__dropout=str(P), run__resume="none", run__save_every="0")
    trainer = Trainer(cfg)
    losses: list[float] = []
    step = trainer.train_step

    def recording_step(micro_batches, start=None):
        record = step(micro_batches, start)
        losses.append(record["loss"])
        return record

    trainer.train_step = recording_step
    trainer.train()
    norms = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
             if n.endswith("norm.weight")}  # replicated: updated from replicated activations
    return {"losses": losses, "norms": norms}


def test_tp2_trainer_with_dropout_trains(tp2):
    """TP2 Trainer, dropout 0.1: the same finite, decreasing losses on both ranks; the
    replicated norm weights stay identical (equal replicated masks)."""
    ranks = [r["trainer"] for r in tp2]
    losses = [r["losses"] for r in ranks]
    assert len(losses[0]) == STEPS and losses[0] == losses[1]
    assert all(torch.isfinite(torch.tensor(losses[0])))
    assert losses[0][-1] < losses[0][0] - 0.1, losses[0]
    norms = ranks[0]["norms"]
    assert norms and all(torch.equal(norms[n], ranks[1]["norms"][n]) for n in norms)
    assert any(not torch.equal(w, torch.ones_like(w)) for w in norms.values())
