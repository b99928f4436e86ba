"""launch/: the dry-run commands, and a real 2-process CPU job through the single-node script."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import torch

from megarch.config.train import STUDY_PAIRS, load_train_config
from megarch.parallel.spawn import free_port
from megarch.training import read_metrics
from tests.training.helpers import REPO, fast_args
from tools.estimate_memory import (
    A100_GIB,
    FIT_FRACTION,
    choose_layout,
    read_recipe,
    recipe_dp,
    recipe_estimate,
    recipe_overrides,
    recipe_table,
)

SINGLE = os.path.join(REPO, "launch", "torchrun_single_node.sh")
MULTI = os.path.join(REPO, "launch", "torchrun_multi_node.sh")
SLURM = os.path.join(REPO, "launch", "slurm_multi_node.sbatch")


def _run(script: str, env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run(["bash", script, *args], env=environment, capture_output=True,
                          text=True, timeout=timeout)


def test_single_node_dry_run_prints_the_exact_command():
    env = {"DRY_RUN": "1", "GPUS_PER_NODE": "4", "TP": "2", "PRESET": "nd_plm_tiny",
           "MASTER_PORT": "1234", "EXTRA": "--run.steps 7 --optim.lr 1e-3", "PYTHON": "py"}
    out = _run(SINGLE, env, "--run.out_dir", "a b")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        "py", "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
        "--master-addr", "127.0.0.1", "--master-port", "1234", "-m", "megarch.train",
        "--preset", "nd_plm_tiny", "--parallel.tp", "2", "--parallel.pp", "1",
        "--run.steps", "7", "--optim.lr", "1e-3", "--run.out_dir", "a b"]


def test_multi_node_and_slurm_dry_runs_use_c10d_rendezvous():
    env = {"DRY_RUN": "1", "GPUS_PER_NODE": "8", "NNODES": "4", "MASTER_ADDR": "node7",
           "RDZV_ID": "job1", "PYTHON": "py"}
    words = shlex.split(_run(MULTI, env).stdout)
    assert words[:3] == ["py", "-m", "torch.distributed.run"]
    for flag, value in (("--nnodes", "4"), ("--nproc-per-node", "8"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "node7:29500"), ("--rdzv-id", "job1")):
        assert words[words.index(flag) + 1] == value
    slurm_env = {"DRY_RUN": "1", "GPUS_PER_NODE": "8", "SLURM_NNODES": "2",
                 "SLURM_JOB_ID": "99", "MASTER_ADDR": "n1", "PYTHON": "py"}
    words = shlex.split(_run(SLURM, slurm_env).stdout)
    assert words[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "1"]
    assert words[words.index("--rdzv-id") + 1] == "99"
    assert words[words.index("--rdzv-endpoint") + 1] == "n1:29500"


def test_two_process_cpu_job_through_the_single_node_script(embedded, tmp_path):
    """torchrun, 2 processes, gloo, DP2 with ZeRO-1: trains, rank 0 logs and checkpoints."""
    out_dir = str(tmp_path / "run")
    extra = ["-q", *fast_args(embedded, out_dir, 3), "--run.save_every", "0",
             "--parallel.zero1", "true"]
    env = {"GPUS_PER_NODE": "2", "TP": "1", "PRESET": "cd_flm_tiny",
           "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
           "EXTRA": shlex.join(extra), "OMP_NUM_THREADS": "1"}
    out = _run(SINGLE, env, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = read_metrics(out_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert os.listdir(os.path.join(out_dir, "checkpoints")) == ["step_00000003"]
    optimizer = torch.load(os.path.join(out_dir, "checkpoints", "step_00000003", "optimizer.pt"))
    assert len(optimizer["state"]) == len(optimizer["param_groups"][0]["params"]) + len(
        optimizer["param_groups"][1]["params"])  # ZeRO-1 consolidated: every parameter's state


@pytest.mark.slow
def test_tp2_and_pp2_cpu_jobs_through_the_single_node_script(embedded, tmp_path):
    """megarch-train under torchrun with TP2, then PP2: one checkpoint directory per step, a
    model file per shard."""
    for sizes, shards in (({"TP": "2"}, ["model_tp00_pp00.safetensors",
                                           "model_tp01_pp00.safetensors"]),
                          ({"PP": "2"}, ["model_tp00_pp00.safetensors",
                                           "model_tp00_pp01.safetensors"])):
        out_dir = str(tmp_path / "_".join(sizes))
        extra = ["-q", *fast_args(embedded, out_dir, 2), "--run.save_every", "0"]
        env = {"GPUS_PER_NODE": "2", **sizes, "MASTER_PORT": str(free_port()),
               "PYTHON": sys.executable, "EXTRA": shlex.join(extra), "OMP_NUM_THREADS": "1"}
        out = _run(SINGLE, env, timeout=240)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert [r["step"] for r in read_metrics(out_dir)] == [1, 2]
        assert os.listdir(os.path.join(out_dir, "checkpoints")) == ["step_00000002"]
        step = os.path.join(out_dir, "checkpoints", "step_00000002")
        assert sorted(f for f in os.listdir(step) if f.startswith("model")) == shards


PAIRS = [name for name, _, _ in STUDY_PAIRS]


@pytest.mark.parametrize("pair", PAIRS)
def test_recipe_fits_validates_and_is_the_rules_choice(pair, monkeypatch):
    """launch/recipes/<pair>.env: fits 85% of 80 GiB by the estimator at 1 to 64 nodes, is a
    valid TrainConfig for 8 processes per node, and is what choose_layout picks."""
    recipe = read_recipe(pair)
    assert recipe["PRESET"] == pair and recipe["GPUS_PER_NODE"] == "8"
    for nodes in (1, 8, 64):
        dp = recipe_dp(recipe, nodes)
        assert recipe_estimate(recipe, dp)["total_GiB"] <= FIT_FRACTION * A100_GIB
        monkeypatch.setenv("WORLD_SIZE", str(8 * nodes))
        cfg = load_train_config(pair, None, [*recipe_overrides(recipe), "--parallel.tp",
                                             recipe["TP"], "--parallel.pp", recipe["PP"]])
        assert cfg.run.global_batch % (cfg.run.micro_batch * dp) == 0  # whole accumulation
    assert choose_layout(pair) == recipe


def test_recipe_dry_runs_are_the_readme_table():
    """RECIPE=<pair> DRY_RUN=1: the command carries the row's layout; launch/README.md holds
    the table tools/estimate_memory.py --recipes prints."""
    with open(os.path.join(REPO, "launch", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = recipe_table(8)
    assert table in readme, "launch/README.md: paste `tools/estimate_memory.py --recipes`"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    for pair in PAIRS:
        env = {"DRY_RUN": "1", "RECIPE": pair, "NNODES": "8", "MASTER_ADDR": "n1",
               "PYTHON": "py"}
        out = _run(MULTI, env, "--run.steps", "5")
        assert out.returncode == 0, out.stderr
        words = shlex.split(out.stdout)
        args = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
        layout, micro, ckpt, zero1 = rows[pair][:4]
        tp, pp, dp = layout.split(" x ")
        assert (args["--nnodes"], args["--nproc-per-node"], args["--preset"]) == ("8", "8", pair)
        assert (args["--parallel.tp"], args["--parallel.pp"]) == (tp, pp)
        assert int(dp) == 64 // (int(tp) * int(pp))
        assert args["--run.micro_batch"] == micro
        assert args["--model.activation_checkpointing"] == ckpt
        assert args["--parallel.zero1"] == zero1 and words[-2:] == ["--run.steps", "5"]


def test_recipe_errors_and_environment_precedence(tmp_path):
    out = _run(SINGLE, {"DRY_RUN": "1", "RECIPE": "cd_flx"})
    assert out.returncode == 2 and "RECIPE=cd_flx" in out.stderr and "cd_flm" in out.stderr
    out = _run(SINGLE, {"DRY_RUN": "1", "RECIPE": "cd_flm", "TP": "2", "PYTHON": "py"})
    words = shlex.split(out.stdout)
    assert words[words.index("--parallel.tp") + 1] == "2"  # the environment wins
    bad = tmp_path / "bad.env"
    bad.write_text("PRESET=cd_flm\nTP=2\nSEQ=3\n")
    with pytest.raises(ValueError, match="bad.env:3"):
        read_recipe(str(bad))


def _fake_tools(tmp_path, gpus: int = 0, hosts: tuple[str, ...] | None = None) -> dict:
    """PATH with an ``nvidia-smi`` listing ``gpus`` GPUs (none: it fails, as on a login node)
    and, when ``hosts`` is given, an ``scontrol show hostnames`` printing them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: NVIDIA A100-SXM4-80GB (UUID: x)'\n" for i in range(gpus))
    smi.write_text("#!/bin/sh\n" + (lines or "exit 9\n"))
    smi.chmod(0o755)
    if hosts is not None:
        scontrol = bin_dir / "scontrol"
        scontrol.write_text("#!/bin/sh\n" + "".join(f"echo {h}\n" for h in hosts))
        scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_readme_dry_run_on_a_login_node_is_refused_saying_how_to_set_gpus(tmp_path):
    """The README's line without GPUS_PER_NODE on a machine without GPUs: 4 x 1 processes for
    TP4 x PP2 is refused before anything runs, naming GPUS_PER_NODE."""
    env = {**_fake_tools(tmp_path), "DRY_RUN": "1", "NNODES": "4", "TP": "4", "PP": "2",
           "PRESET": "cd_flm", "MASTER_ADDR": "node001", "PYTHON": "py"}
    out = _run(MULTI, env)
    assert out.returncode == 2 and out.stdout == ""
    assert "4 x 1 = 4 processes is not a multiple of TP x PP = 4 x 2 = 8" in out.stderr
    assert "no GPU is visible here" in out.stderr and "GPUS_PER_NODE=8" in out.stderr
    out = _run(MULTI, {**env, "GPUS_PER_NODE": "8"})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    words = shlex.split(out.stdout)
    assert words[words.index("--nproc-per-node") + 1] == "8"


def test_gpus_per_node_comes_from_nvidia_smi_and_a_gpu_less_default_is_noted(tmp_path):
    env = {"DRY_RUN": "1", "TP": "2", "PYTHON": "py"}
    out = _run(SINGLE, {**env, **_fake_tools(tmp_path, gpus=4)})
    words = shlex.split(out.stdout)
    assert out.returncode == 0 and words[words.index("--nproc-per-node") + 1] == "4"
    out = _run(SINGLE, {**env, **_fake_tools(tmp_path / "none"), "TP": "1"})
    assert out.returncode == 0 and "note: no GPU is visible" in out.stderr
    out = _run(SINGLE, {**env, **_fake_tools(tmp_path / "none")})  # TP2 on one process
    assert out.returncode == 2
    assert "1 x 1 = 1 processes is not a multiple of TP x PP = 2 x 1 = 2" in out.stderr


@pytest.mark.parametrize("addr", ["", "127.0.0.1", "localhost"])
def test_several_nodes_at_a_loopback_master_addr_are_refused(tmp_path, addr):
    env = {**_fake_tools(tmp_path), "DRY_RUN": "1", "NNODES": "2", "GPUS_PER_NODE": "8",
           "PYTHON": "py"}
    if addr:
        env["MASTER_ADDR"] = addr
    out = _run(MULTI, env)
    assert out.returncode == 2 and out.stdout == ""
    assert f"NNODES=2 with MASTER_ADDR={addr or '127.0.0.1'}" in out.stderr
    assert ("(the default)" in out.stderr) == (not addr) and "MASTER_ADDR=node001" in out.stderr
    one = _run(MULTI, {**env, "NNODES": "1"})  # one node may use loopback
    assert one.returncode == 0, one.stderr


def test_bad_sizes_and_single_node_with_several_nodes_are_refused(tmp_path):
    base = {**_fake_tools(tmp_path), "DRY_RUN": "1", "GPUS_PER_NODE": "8", "PYTHON": "py"}
    for name, value in (("TP", "0"), ("PP", "two"), ("GPUS_PER_NODE", "-1"), ("NNODES", "1.5")):
        out = _run(MULTI, {**base, "MASTER_ADDR": "n1", name: value})
        assert out.returncode == 2 and f"{name}={value}: must be a positive integer" in out.stderr
    out = _run(SINGLE, {**base, "NNODES": "2"})
    assert out.returncode == 2 and "torchrun_multi_node.sh" in out.stderr
    out = _run(MULTI, {**base, "RECIPE": "ed_plm", "GPUS_PER_NODE": "2", "MASTER_ADDR": "n1"})
    assert out.returncode == 2
    assert "TP x PP = 4 x 1 = 4 (the layout of launch/recipes/ed_plm.env)" in out.stderr


def test_slurm_takes_master_addr_and_gpus_from_the_allocation(tmp_path):
    env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NNODES": "2",
           "SLURM_GPUS_PER_NODE": "a100:8", "TP": "4", "PP": "2", "PYTHON": "py"}
    out = _run(SLURM, {**env, **_fake_tools(tmp_path, hosts=("gpu001", "gpu002"))})
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[words.index("--rdzv-endpoint") + 1] == "gpu001:29500"
    assert words[words.index("--nproc-per-node") + 1] == "8"
    # no scontrol (not on the cluster): loopback, refused for two nodes
    out = _run(SLURM, {**env, **_fake_tools(tmp_path / "bare")})
    assert out.returncode == 2 and "scontrol could not read" in out.stderr
    out = _run(SLURM, {**env, **_fake_tools(tmp_path / "few", hosts=("n1", "n2")),
                       "SLURM_GPUS_PER_NODE": "2"})  # 2 x 2 for TP4 x PP2
    assert out.returncode == 2 and "2 x 2 = 4 processes" in out.stderr
