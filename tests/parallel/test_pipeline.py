"""Pipeline parallelism (own 1F1B and interleaved 1F1B over gloo p2p) equals the single process.

Each rank builds the single-process model (same seed), loads its stage from it by name, and
both train with AdamW on the same batches split in micro-batches; the last stage's loss and
every stage's gradients (embedding copies summed over the ranks holding one) are compared, and
the global gradient norm (reduced over TP and pipeline groups) clips as in one process. The
schedules' timetables are checked against the ideal pipeline's length without processes.
"""

from __future__ import annotations

import pytest
import torch

from megarch.config.overrides import ConfigError
from megarch.config.train import ParallelConfig, TrainConfig
from megarch.model import build_model, build_stage, lm_loss, pipeline_layout, stage_layers
from megarch.parallel import ParallelContext, clip_grad_norm
from megarch.parallel.pipeline import interleaved_one_f_one_b, one_f_one_b
from megarch.parallel.pipeline_schedules import (
    forward_order,
    interleaved_order,
    one_f_one_b_order,
    timetable,
)
from megarch.parallel.spawn import spawn
from megarch.parallel.tensor_parallel import partition_dims, shard_tensor
from tests.parallel.helpers import labels_and_mask, relative_difference, tiny_batch, tiny_config

STEPS, MICRO = 3, 4
BF16_TOLERANCE = 1e-2
"""Relative difference allowed between the bf16-autocast pipeline and single process."""


def _split(batch: dict, parts: int) -> list[dict]:
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def _reference_step(model, batch: dict, opt, dtype: torch.dtype | None = None) -> float:
    labels, mask = labels_and_mask(batch)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = model(**batch)
    out = lm_loss(logits, labels, mask, model.cfg.z_loss)
    opt.zero_grad()
    out["loss"].backward()
    return out["loss"].item()


def _pipeline_step(stage, batch: dict, opt, tp_group, dtype: torch.dtype | None = None) -> float:
    micro = _split(batch, MICRO)
    tokens = labels_and_mask(batch)[1].sum()

    def loss_fn(logits, mb):
        labels, mask = labels_and_mask(mb)
        return lm_loss(logits, labels, mask, stage.cfg.z_loss, num_tokens=tokens,
                       tp_group=tp_group)

    opt.zero_grad()
    schedule = interleaved_one_f_one_b if stage.virtual_stages > 1 else one_f_one_b
    results = schedule(stage, micro, loss_fn, dtype)
    return sum(r["loss"].item() for r in results)


def _compare(rank: int, world: int, arch: str, tp: int, n_layers: int, virtual: int = 1,
             encoder_stages: int = 0, tie: bool = True, bf16: bool = False) -> dict:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    cfg.n_layers, cfg.tie_embeddings = n_layers, tie
    reference = build_model(cfg)
    ctx = ParallelContext.build(tp=tp, pp=world // tp)
    stage = build_stage(cfg, ctx, virtual_stages=virtual, encoder_stages=encoder_stages)
    initial_embed = stage.embed.weight.sum().item() if stage.embed is not None else None
    full, dims = reference.state_dict(), partition_dims(stage)
    stage.load_state_dict({n: shard_tensor(full[n], dims[n], ctx.tp_rank, tp)
                           for n in stage.state_dict()})
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    ref_losses, losses, grads, norms = [], [], {}, []
    dtype = torch.bfloat16 if bf16 else None
    fp32_loss = _reference_step(reference, tiny_batch(arch, 0, batch=8), ref_opt)
    for step in range(STEPS):
        batch = tiny_batch(arch, step, batch=8)
        ref_losses.append(_reference_step(reference, batch, ref_opt, dtype))
        losses.append(_pipeline_step(stage, batch, opt, stage.tp_group, dtype))
        if step == 0:
            ref_grads = {n: p.grad for n, p in reference.named_parameters()}
            grads = {n: relative_difference(
                p.grad, shard_tensor(ref_grads[n], dims[n], ctx.tp_rank, tp))
                for n, p in stage.named_parameters()}
        norms.append((clip_grad_norm(reference, 0.5, None),
                      clip_grad_norm(stage, 0.5, stage.tp_group, ctx.pp_group,
                                     stage.duplicated_parameters)))
        ref_opt.step()
        opt.step()
    return {"embed0": initial_embed, "last": ctx.is_last_stage, "losses": losses,
            "norms": norms, "ref": ref_losses, "grads": grads, "fp32_loss": fp32_loss,
            "reference_names": sorted(full),
            "layers": [list(stage.layout.layers[k]) for k in stage.chunks]}


def _check(results: list[dict], tol: float = 1e-5) -> None:
    names = set().union(*(res["grads"] for res in results))
    assert names == set(results[0]["reference_names"])  # every parameter is on some stage
    for res in results:
        for ref_norm, norm in res["norms"]:  # clipped (all > 0.5) and equal across layouts
            assert ref_norm > 0.5 and abs(norm - ref_norm) <= tol * ref_norm
        worst = max(res["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= tol, worst
        if res["last"]:
            diff = max(abs(a - b) / abs(b) for a, b in zip(res["losses"], res["ref"],
                                                          strict=True))
            assert diff <= tol, (res["losses"], res["ref"])


CASES = {  # name: (arch, tp, n_layers, virtual stages)
    "cd_1f1b": ("causal_decoder", 1, 3, 1),  # uneven split: 2 + 1
    "nd_1f1b": ("nonc_decoder", 1, 3, 1),
    "cd_interleaved": ("causal_decoder", 1, 4, 2),  # 4 layers, 2 x 2 virtual stages
    "nd_interleaved": ("nonc_decoder", 1, 4, 2),
    "ed_1f1b": ("encoder_decoder", 1, 2, 1),  # 2 encoder + 2 decoder layers
    "ed_interleaved": ("encoder_decoder", 1, 2, 2),
    "cd_interleaved_bf16": ("causal_decoder", 1, 4, 2, 0, True, True),  # forward autocast
}


def _cases(rank: int, world: int, names: list[str]) -> dict:
    return {name: _compare(rank, world, *CASES[name]) for name in names}


def test_pp2_schedules_match_single_process():
    """PP2, 4 micro-batches, one job: 1F1B and interleaved 1F1B (2 virtual stages per rank)
    for the causal and non-causal decoders and the encoder-decoder give the single process's
    losses over 3 steps and its gradients (by name) after the first."""
    per_rank = spawn(2, timeout_s=240)(_cases, list(CASES))
    results = {name: [per_rank[r][name] for r in range(2)] for name in CASES}
    for name, res in results.items():
        try:
            _check(res, BF16_TOLERANCE if name.endswith("bf16") else 1e-5)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err
    bf16 = results["cd_interleaved_bf16"][1]  # autocast was on: the loss is not fp32's
    assert abs(bf16["ref"][0] - bf16["fp32_loss"]) > 10 * abs(bf16["losses"][0] - bf16["ref"][0])
    for name in ("cd_1f1b", "nd_1f1b"):
        res = results[name]
        assert [r["layers"] for r in res] == [[[0, 1]], [[2]]]
        assert res[0]["embed0"] == res[1]["embed0"]  # the tied copies start equal
        assert "embed.weight" in res[0]["grads"] and "embed.weight" in res[1]["grads"]
    for name in ("cd_interleaved", "nd_interleaved"):  # Megatron's chunk assignment
        res = results[name]
        assert [r["layers"] for r in res] == [[[0], [2]], [[1], [3]]]
        assert {n.split(".")[1] for n in res[0]["grads"] if n.startswith("blocks.")} == {"0",
                                                                                          "2"}
    # the encoder on rank 0, the decoder on rank 1; the shared embedding on both, in sync
    encoder, decoder = (set(r["grads"]) for r in results["ed_1f1b"])
    assert "encoder_norm.weight" in encoder and "encoder_blocks.1.ff.wo.weight" in encoder
    assert "decoder_norm.weight" in decoder and "decoder_blocks.0.cross.q.weight" in decoder
    assert not any(n.startswith("decoder") for n in encoder)
    assert results["ed_1f1b"][0]["embed0"] == results["ed_1f1b"][1]["embed0"]
    # interleaved: encoder blocks 0 / 1 on ranks 0 / 1, then decoder blocks 0 / 1 on ranks
    # 0 / 1: the encoder output crosses from rank 1 back to rank 0 and on to rank 1
    assert [r["layers"] for r in results["ed_interleaved"]] == [[[0], [0]], [[1], [1]]]


@pytest.mark.slow
def test_tp2_pp2_matches_single_process():
    results = spawn(4, timeout_s=240)(_compare, "causal_decoder", 2, 3)
    _check(results)


@pytest.mark.slow
def test_tp2_pp2_encoder_decoder_matches_single_process():
    results = spawn(4, timeout_s=240)(_compare, "encoder_decoder", 2, 2)
    _check(results)


@pytest.mark.slow
def test_pp4_encoder_decoder_three_embedding_copies():
    """PP4, 2 encoder stages: ranks 0 (encoder), 2 (first decoder) and 3 (tied output) hold the
    embedding; the encoder output travels through rank 2 to rank 3."""
    results = spawn(4, timeout_s=240)(_compare, "encoder_decoder", 1, 2, 1, 2)
    held = [r["embed0"] is not None for r in results]
    assert held == [True, False, True, True]
    assert len({r["embed0"] for r in results if r["embed0"] is not None}) == 1
    _check(results)


@pytest.mark.slow
def test_pp4_interleaved_untied_matches_single_process():
    """PP4 x 2 virtual stages, untied output projection: the embedding on rank 0 only, the
    output projection on rank 3."""
    results = spawn(4, timeout_s=240)(_compare, "nonc_decoder", 1, 8, 2, 0, False)
    assert results[1]["layers"] == [[1], [5]]
    assert [r["embed0"] is not None for r in results] == [True, False, False, False]
    assert "lm_head.weight" in results[3]["grads"]
    _check(results)


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("virtual", [1, 2, 3])
def test_timetables_have_the_ideal_pipeline_length(pp, virtual):
    """Unit-time operations: 1F1B takes 2 m + 2 (pp - 1) slots, interleaved 1F1B
    2 m v + 2 (pp - 1) chunk slots (its bubble is v times smaller); every rank runs each
    (micro-batch, chunk) forward and backward once, the backward after the forward."""
    for micro in (pp, 2 * pp, 3 * pp):
        orders = [interleaved_order(pp, virtual, r, micro) for r in range(pp)]
        slots = timetable(orders, virtual)
        assert max(max(s) for s in slots) + 1 == 2 * micro * virtual + 2 * (pp - 1)
        for order in orders:
            assert sorted(order) == sorted((b, m, c) for b in (False, True)
                                           for m in range(micro) for c in range(virtual))
            assert all(order.index((False, m, c)) < order.index((True, m, c))
                       for _, m, c in order)
        if virtual == 1:
            slots = timetable([one_f_one_b_order(pp, r, micro) for r in range(pp)], 1)
            assert max(max(s) for s in slots) + 1 == 2 * micro + 2 * (pp - 1)
        slots = timetable([forward_order(pp, virtual, r, 1) for r in range(pp)], virtual)
        assert max(max(s) for s in slots) + 1 == pp * virtual  # one micro-batch, in a chain


def test_interleaved_order_is_megatrons():
    """Recorded: Megatron's interleaved order for pp 2, 2 chunks, 4 micro-batches, rank 1
    (2 warm-up forwards; F/B as (micro, chunk))."""
    order = [("B" if o.backward else "F", o.micro, o.chunk) for o in interleaved_order(2, 2, 1, 4)]
    assert order == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("B", 0, 1), ("F", 1, 1),
                     ("B", 1, 1), ("F", 2, 0), ("B", 0, 0), ("F", 3, 0), ("B", 1, 0),
                     ("F", 2, 1), ("B", 2, 1), ("F", 3, 1), ("B", 3, 1), ("B", 2, 0),
                     ("B", 3, 0)]
    with pytest.raises(ValueError, match="multiple of pp=2 micro-batches"):
        interleaved_order(2, 2, 0, 3)
    with pytest.raises(RuntimeError, match="deadlocks"):  # a backward before its forward
        timetable([[one_f_one_b_order(1, 0, 1)[1], one_f_one_b_order(1, 0, 1)[0]]], 1)


def test_layouts():
    """Decoder-only: an even split; encoder-decoder: encoder stages by layer count."""
    cfg = tiny_config("causal_decoder")
    cfg.n_layers = 6
    assert pipeline_layout(cfg, 3, 2).layers == tuple(range(i, i + 1) for i in range(6))
    assert list(stage_layers(7, 3, 0)) == [0, 1, 2]
    ed = tiny_config("encoder_decoder")
    ed.n_layers, ed.n_decoder_layers = 6, 2
    layout = pipeline_layout(ed, 4)
    assert layout.encoder_stages == 3  # round(4 * 6 / 8)
    assert layout.layers == (range(0, 2), range(2, 4), range(4, 6), range(0, 2))
    assert pipeline_layout(ed, 4, encoder_stages=2).layers[2:] == (range(0, 1), range(1, 2))
    ed.n_layers, ed.n_decoder_layers = 1, 5
    assert pipeline_layout(ed, 4).encoder_stages == 1


def _train_config(arch: str, **parallel) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = tiny_config(arch)
    cfg.data.layout = "encoder_decoder" if arch == "encoder_decoder" else "decoder"
    cfg.data.objective = "plm"
    cfg.run.micro_batch, cfg.run.global_batch = 2, 8
    cfg.parallel = ParallelConfig(**parallel)
    return cfg


@pytest.mark.parametrize("arch, parallel, message", [
    ("causal_decoder", {"pp": 2, "virtual_stages": 0}, r"parallel.virtual_stages=0: must be"),
    ("causal_decoder", {"virtual_stages": 2}, r"virtual_stages=2 with parallel.pp=1"),
    ("causal_decoder", {"pp": 2, "virtual_stages": 3}, r"n_layers=2 does not split into "
                                                      r"parallel.pp x virtual_stages = 6"),
    ("causal_decoder", {"pp": 2, "encoder_stages": 1}, r"only encoder-decoders"),
    ("causal_decoder", {"pp": 2, "virtual_stages": 2, "encoder_stages": 0}, None),
    ("encoder_decoder", {"pp": 2, "encoder_stages": 2}, r"encoder_stages=2 with parallel.pp x "
                                                       r"virtual_stages = 2"),
    ("encoder_decoder", {"pp": 4, "virtual_stages": 2}, r"every stage needs a block"),
    ("encoder_decoder", {"pp": 2, "encoder_stages": -1}, r"encoder_stages=-1: must be >= 0"),
    ("encoder_decoder", {"encoder_stages": 1}, r"encoder_stages=1 with parallel.pp=1"),
])
def test_pipeline_config_errors(monkeypatch, arch, parallel, message):
    monkeypatch.setenv("WORLD_SIZE", str(parallel.get("pp", 1)))
    cfg = _train_config(arch, **parallel)
    if message is None:
        cfg.model.n_layers = 4
        cfg.validate()
        return
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_interleaving_needs_micro_batches_multiple_of_pp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _train_config("causal_decoder", pp=2, virtual_stages=2)
    cfg.model.n_layers = 4
    cfg.run.micro_batch, cfg.run.global_batch = 2, 6  # 3 micro-batches
    with pytest.raises(ConfigError, match=r"multiple of parallel.pp=2 micro-batches per step, "
                                          r"got 3"):
        cfg.validate()
    with pytest.raises(ValueError, match="is not divisible by parallel.pp x virtual_stages"):
        pipeline_layout(tiny_config("causal_decoder"), 2, 3)
