"""The Trainer under data and tensor parallelism equals the single-process Trainer.

Same preset, seed, data and global batch: DP2 (and DP2 with ZeRO-1, with accumulation), TP2
(with sequence parallelism) and PP2 (decoder stages, 1F1B), all started the ordinary way (the
weights come from the seed alone, the same at every layout), must give the single process's
per-step losses, final weights and (PP2) validation loss. One spawned job runs all.
"""

from __future__ import annotations

import os

import pytest
import torch

from megarch.parallel import gather_full_state_dict
from megarch.parallel.spawn import spawn
from megarch.training import Trainer, load_model, read_metrics
from megarch.training.checkpoint import step_path
from tests.parallel.helpers import relative_difference
from tests.training.helpers import fast_config
from tools.reshard_checkpoint import reshard

STEPS = 3
PRESET = "cd_flm_tiny"


def _config(embedded, out_dir: str, **extra: str):
    values = {"run__resume": "none", "run__save_every": "0", **extra}
    return fast_config(PRESET, embedded, out_dir, STEPS, **values)


def _losses(out_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir)]


def _ranks(rank: int, world: int, embedded, root: str) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name, extra in (("dp2", {}), ("zero1", {"parallel__zero1": "true",
                                                "run__micro_batch": "2"})):
        trainer = Trainer(_config(embedded, os.path.join(root, name), **extra))
        trainer.train()
        out[name] = {"params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                     "zero1": type(trainer.optimizer).__name__}
    resumed = Trainer(_config(embedded, os.path.join(root, "zero1"), parallel__zero1="true",
                              run__micro_batch="2", run__resume="auto"))
    resumed.resume()  # the consolidated state, re-sharded over the DP ranks
    out["zero1"]["resumed_step"] = resumed.state.step
    out["zero1"]["resumed_local_state"] = len(resumed.optimizer.optim.state)
    trainer = Trainer(_config(embedded, os.path.join(root, "tp2"), parallel__tp="2",
                              parallel__sequence_parallel="true"))
    assert trainer.model.sequence_parallel
    trainer.train()
    params = gather_full_state_dict(trainer.model, trainer.tp_group)
    resumed = Trainer(_config(embedded, os.path.join(root, "tp2"), parallel__tp="2",
                              parallel__sequence_parallel="true", run__resume="auto"))
    resumed.resume()  # this TP rank's shard of step 3
    again = gather_full_state_dict(resumed.model, resumed.tp_group)
    out["tp2"] = {"params": params, "checkpoint": trainer.checkpoint,
                  "resumed_step": resumed.state.step,
                  "resumed_equal": all(torch.equal(again[k], v) for k, v in params.items())}
    trainer = Trainer(_config(embedded, os.path.join(root, "pp2"), parallel__pp="2",
                              run__eval_batches="2"))
    initial_q = trainer.model.state_dict()[f"blocks.{rank}.attn.q.weight"].clone()
    result = trainer.train()
    out["pp2"] = {"params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                  "valid": result.valid_loss, "checkpoint": trainer.checkpoint,
                  "initial_q": initial_q}
    return out


def test_dp2_zero1_tp2_pp2_trainers_match_single_process(embedded, tmp_path):
    single = Trainer(_config(embedded, str(tmp_path / "single"), run__eval_batches="2"))
    valid = single.train().valid_loss
    reference = _losses(str(tmp_path / "single"))
    weights = single.model.state_dict()
    results = spawn(2, timeout_s=180)(_ranks, embedded, str(tmp_path))
    for name in ("dp2", "zero1", "tp2", "pp2"):
        losses = _losses(str(tmp_path / name))  # written by rank 0 only
        assert len(losses) == STEPS
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        assert worst <= 1e-5, (name, losses, reference)
        for rank in range(2):
            params = results[rank][name]["params"]
            diff = max(relative_difference(params[k], weights[k]) for k in params)
            assert diff <= 1e-4, (name, rank, diff)
    assert results[0]["zero1"]["zero1"] == "ZeroRedundancyOptimizer"
    local = [results[r]["zero1"]["resumed_local_state"] for r in range(2)]
    assert results[0]["zero1"]["resumed_step"] == STEPS and min(local) > 0
    assert sum(local) == len(weights)  # each rank holds the state of its share only
    tp_checkpoints = {results[r]["tp2"]["checkpoint"] for r in range(2)}
    assert len(tp_checkpoints) == 1  # one step directory for the job, a shard file per rank
    assert os.path.isfile(os.path.join(tp_checkpoints.pop(), "model_tp01_pp00.safetensors"))
    for rank in range(2):
        assert results[rank]["tp2"]["resumed_step"] == STEPS
        assert results[rank]["tp2"]["resumed_equal"]
    stages = [set(results[r]["pp2"]["params"]) for r in range(2)]
    assert "blocks.0.attn.q.weight" in stages[0] - stages[1]
    assert "blocks.1.attn.q.weight" in stages[1] - stages[0]
    assert "embed.weight" in stages[0] & stages[1]  # tied: first and last stage
    # each stage initialises its own blocks: not copies of the other stage's
    assert not torch.equal(results[0]["pp2"]["initial_q"], results[1]["pp2"]["initial_q"])
    assert all(abs(results[r]["pp2"]["valid"] - valid) <= 1e-5 * valid for r in range(2))
    assert os.path.isfile(os.path.join(results[1]["pp2"]["checkpoint"],
                                       "model_tp00_pp01.safetensors"))
    _check_merged_checkpoint(embedded, tmp_path, "tp2", results[0]["tp2"]["params"])
    pp_params = {**results[1]["pp2"]["params"], **results[0]["pp2"]["params"]}
    _check_merged_checkpoint(embedded, tmp_path, "pp2", pp_params)


def _check_merged_checkpoint(embedded, tmp_path, name: str, params: dict) -> None:
    """tools/reshard_checkpoint.py: TP2 / PP2 checkpoints -> one TP1 x PP1 checkpoint with
    the same weights, which a TP1 x PP1 run resumes (step and AdamW state)."""
    merged = reshard(str(tmp_path / name), str(tmp_path / f"{name}_merged"))
    model, cfg = load_model(merged)
    assert cfg.parallel.tp == 1 and cfg.parallel.pp == 1
    assert set(model.state_dict()) == set(params)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in params.items())
    trainer = Trainer(_config(embedded, str(tmp_path / f"{name}_continued"),
                              run__resume=merged))
    trainer.resume()
    assert trainer.state.step == STEPS
    exp_avg = trainer.optimizer.state[trainer.model.embed.weight]["exp_avg"]
    assert exp_avg.shape == trainer.model.embed.weight.shape and exp_avg.abs().sum() > 0


def _tp2_pp2(rank: int, world: int, embedded, root: str) -> None:
    torch.set_num_threads(1)
    Trainer(_config(embedded, root, parallel__tp="2", parallel__pp="2")).train()


@pytest.mark.slow
def test_tp2_pp2_trainer_matches_single_process_and_merges_to_tp1(embedded, tmp_path):
    """4 processes: TP2 x PP2 losses = single process; its 4 checkpoints merge into one TP1 x PP1
    checkpoint holding the single process's final weights."""
    single = Trainer(_config(embedded, str(tmp_path / "single")))
    single.train()
    spawn(4, timeout_s=300)(_tp2_pp2, embedded, str(tmp_path / "tp2pp2"))
    losses, reference = _losses(str(tmp_path / "tp2pp2")), _losses(str(tmp_path / "single"))
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True)) <= 1e-5
    model, _ = load_model(reshard(str(tmp_path / "tp2pp2"), str(tmp_path / "merged")))
    weights = single.model.state_dict()
    assert max(relative_difference(model.state_dict()[k], w) for k, w in weights.items()) < 1e-4


PIPELINE_RUNS = {  # name: (preset, overrides) run in one process and on two
    "ed_pp2": ("ed_plm_tiny", {"parallel__pp": "2"}),  # encoder stage, decoder stage
    "ed_tp2": ("ed_plm_tiny", {"parallel__tp": "2"}),
    "cd_interleaved": (PRESET, {"model__n_layers": "4", "parallel__pp": "2",
                                "parallel__virtual_stages": "2"}),
}


def _pipeline_config(embedded, out_dir: str, name: str, parallel: bool):
    preset, extra = PIPELINE_RUNS[name]
    if not parallel:
        extra = {k: v for k, v in extra.items() if not k.startswith("parallel__")}
    return fast_config(preset, embedded, out_dir, STEPS, run__resume="none",
                       run__save_every="0", run__eval_batches="2", **extra)


def _pipeline_ranks(rank: int, world: int, embedded, root: str) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name in PIPELINE_RUNS:
        trainer = Trainer(_pipeline_config(embedded, os.path.join(root, name), name, True))
        result = trainer.train()  # the weights come from the seed alone, as in one process
        params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if trainer.ctx.tp > 1:
            params = gather_full_state_dict(trainer.model, trainer.tp_group)
        out[name] = {"params": params, "valid": result.valid_loss}
    return out


def test_encoder_decoder_pp2_and_interleaved_trainers_match_single_process(embedded, tmp_path):
    """Trainer level, started the ordinary way: the encoder-decoder over PP2 (encoder stage,
    decoder stage) and TP2, and the causal decoder over PP2 x 2 virtual stages give the
    one-process run's losses, validation loss and final weights; a one-process run resumes
    their last checkpoint with those weights."""

    singles = {}
    for name in PIPELINE_RUNS:
        trainer = Trainer(_pipeline_config(embedded, str(tmp_path / f"{name}_single"), name,
                                           False))
        singles[name] = (trainer.train().valid_loss, trainer.model.state_dict())
    results = spawn(2, timeout_s=240)(_pipeline_ranks, embedded, str(tmp_path))
    for name, (valid, weights) in singles.items():
        losses, reference = _losses(str(tmp_path / name)), _losses(str(tmp_path / f"{name}_single"))
        assert len(losses) == STEPS
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        assert worst <= 1e-5, (name, losses, reference)
        params = {**results[1][name]["params"], **results[0][name]["params"]}
        assert set(params) == set(weights)
        diff = max(relative_difference(params[k], weights[k]) for k in params)
        assert diff <= 1e-4, (name, diff)
        assert all(abs(r[name]["valid"] - valid) <= 1e-5 * valid for r in results)
        resumed = Trainer(_pipeline_config(embedded, str(tmp_path / f"{name}_to_pp1"), name,
                                           False))
        resumed.cfg.run.resume = step_path(str(tmp_path / name), STEPS)
        resumed.resume()  # the stages' checkpoint loads into one process by name
        assert resumed.state.step == STEPS
        assert all(torch.equal(v, params[k]) for k, v in resumed.model.state_dict().items())
    stages = [set(results[r]["ed_pp2"]["params"]) for r in range(2)]
    assert "encoder_norm.weight" in stages[0] - stages[1]
    assert "decoder_blocks.0.cross.q.weight" in stages[1] - stages[0]
    assert "embed.weight" in stages[0] & stages[1]
    assert "blocks.2.attn.q.weight" in set(results[0]["cd_interleaved"]["params"])
