"""The estimator's step-time model (tools/estimate_memory.py step_time) against hand arithmetic
on two layouts, and the layout planner (--plan): fitting layouts only, fastest first."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from megarch.config.train import load_train_config
from tests.training.helpers import REPO
from tools.estimate_memory import (
    FIT_FRACTION,
    Hardware,
    estimate_config,
    plan_layouts,
    step_time,
)

MIB = 2**20


def _cfg(preset: str, micro: int, ckpt: bool, tp: int, pp: int, dp: int, virtual: int = 1):
    cfg = load_train_config(preset, None, ["--run.micro_batch", str(micro),
                                           "--model.activation_checkpointing",
                                           str(ckpt).lower()])
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, dp=dp,
                                       virtual_stages=virtual)
    cfg.model.vocab_size = cfg.model.vocab_size or 32128
    return cfg


def test_step_time_of_the_cd_flm_recipe_by_hand():
    """cd_flm (626 tokens a row, 2048 rows a step) on 64 GPUs as its recipe: TP1 x PP1 x DP64,
    micro-batch 4, no checkpointing, plain data parallelism."""
    cfg = _cfg("cd_flm", 4, False, 1, 1, 64)
    est = estimate_config(cfg, 1, 1, 64, False)
    got = step_time(cfg, 1, 1, 64, False, est=est)
    params, flops = est["parameters_per_rank_M"] * 1e6, est["step_PFLOP_per_rank"] * 1e15
    assert 4.5e9 < params < 5.0e9  # the 4.8B decoder, unsplit
    fill = 4 * 626 / (4 * 626 + 512)
    compute = flops / (312e12 * 0.5 * fill)
    m = 2048 // (4 * 64)  # 8 micro-batches
    all_reduce = 2 * 63 / 64 * 4 * params / 25e9  # ring all-reduce of the fp32 gradients
    window = compute / m * 2 / 3  # the last micro-batch's backward
    tail = 2 * 63 / 64 * 25 * MIB / 25e9  # the last bucket
    exposed = max(all_reduce - window, tail)
    assert got["micro_batches"] == 8
    assert got["compute_s"] == pytest.approx(compute, rel=1e-12)
    assert got["bubble_s"] == got["tp_s"] == got["pp_s"] == 0
    assert got["dp_s"] == pytest.approx(all_reduce, rel=1e-12)
    assert got["dp_exposed_s"] == pytest.approx(exposed, rel=1e-12)
    assert got["step_s"] == pytest.approx(compute + exposed, rel=1e-12)
    # recorded: ~1.5 s of all-reduce (the figure at 25 GB/s), ~0.4 s of it hidden
    # behind the last of the 8 micro-batches' backward
    assert 1.4 < all_reduce < 1.6 and 1.0 < exposed < 1.2
    post = step_time(cfg, 1, 1, 64, False, est=est, overlap=False)
    assert post["dp_exposed_s"] == pytest.approx(all_reduce, rel=1e-12)


def test_step_time_of_an_interleaved_zero_layout_by_hand():
    """ed_mlm (512 + 114 tokens a row) on TP2 x PP4 (2 virtual stages) x DP8, micro-batch 8,
    activation checkpointing, ZeRO-1; bandwidths 50 / 200 GB/s."""
    hw = Hardware(dp_gbps=50.0, tp_gbps=200.0)
    cfg = _cfg("ed_mlm", 8, True, 2, 4, 8, virtual=2)
    est = estimate_config(cfg, 2, 4, 8, True, virtual_stages=2)
    got = step_time(cfg, 2, 4, 8, True, 2, hw, est)
    params, flops = est["parameters_per_rank_M"] * 1e6, est["step_PFLOP_per_rank"] * 1e15
    tokens = 8 * (512 + 114)
    compute = flops * 4 / 3 / (312e12 * 0.5 * tokens / (tokens + 512))
    m = 2048 // (8 * 8)  # 32
    bubble = compute * 3 / (2 * m)
    d, layers = 4096, 24
    per_micro = 2 * layers * 8 * 512 * d + 3 * layers * 8 * 114 * d  # elements all-reduced
    tp = 3 * m * per_micro / 4 * 2 * (2 * 1 / 2) / 200e9  # fwd, bwd, recompute; bf16; ring
    pp = 2 * m * 2 * tokens * d * 4 / 200e9  # fp32 hidden states there and back, 2 chunks
    reduce = 7 / 8 * 4 * params / 50e9
    gather = 7 / 8 * 4 * params / 50e9
    window = compute / m * 0.75
    tail = 7 / 8 * min(25 * MIB, 4 * params) / 50e9
    exposed = max(reduce - window, tail) + gather
    for key, value in (("compute_s", compute), ("bubble_s", bubble), ("tp_s", tp),
                       ("pp_s", pp), ("dp_s", reduce + gather), ("dp_exposed_s", exposed),
                       ("step_s", compute + bubble + tp + pp + exposed)):
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["tokens_per_s"] == pytest.approx(2048 * 626 / got["step_s"], rel=1e-12)


def test_plan_ranks_fitting_layouts_fastest_first():
    cfg = load_train_config("nd_mlm", None, [])
    cfg.model.vocab_size = cfg.model.vocab_size or 32128
    rows = plan_layouts(cfg, 64, 80.0)
    assert len(rows) > 20
    assert all(r["total_GiB"] <= FIT_FRACTION * 80.0 for r in rows)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert all(r["tp"] * r["pp"] * r["dp"] == 64 and r["tp"] * r["pp"] <= 8 for r in rows)
    seen = {k: {r[k] for r in rows} for k in ("tp", "pp", "virtual_stages", "micro_batch",
                                              "activation_checkpointing", "zero1")}
    assert all(len(v) > 1 for v in seen.values()), seen
    best = rows[0]
    trial = _cfg("nd_mlm", best["micro_batch"], best["activation_checkpointing"], best["tp"],
                 best["pp"], best["dp"], best["virtual_stages"])
    again = step_time(trial, best["tp"], best["pp"], best["dp"], best["zero1"],
                      best["virtual_stages"])
    assert again["step_s"] == pytest.approx(best["step_s"], rel=1e-12)
    small = plan_layouts(cfg, 64, 24.0)  # less memory: fewer layouts, all in the larger plan
    assert 0 < len(small) < len(rows)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "estimate_memory.py"),
                           *args], env=env, capture_output=True, text=True, timeout=120)


def test_plan_cli_prints_the_table_and_refuses_bad_sizes():
    out = _cli("--plan", "--preset", "cd_mlm", "--gpus", "16", "--gpu-mem", "80", "--top", "3")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 3 and lines[1].startswith("| 1 |")
    bad = _cli("--plan", "--gpus", "0")
    assert bad.returncode == 2 and "--gpus 0: must be > 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    none = _cli("--plan", "--preset", "ed_mlm", "--gpus", "8", "--gpu-mem", "8")
    assert none.returncode == 2 and "no layout of 8 GPUs fits 8 GiB" in none.stderr


def test_recipe_plan_table_ranks_every_recipe_layout():
    """Each launch/recipes layout fits at 8 nodes, so it has a rank in its pair's plan."""
    from tools.estimate_memory import recipe_plan_table

    table = recipe_plan_table(8).splitlines()
    assert len(table) == 2 + 6
    for line in table[2:]:
        own = line.split("|")[2]
        assert "does not fit" not in own and " / " in own, line
