"""tools/bench_parallel.py at its smallest size: the table's rows and ratios are printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.training.helpers import REPO
from tools.bench_parallel import format_table, main, parse_args


def test_bench_parallel_prints_rows_and_ratios():
    """Real gloo processes: every layout's row with a positive time, the checkpoint rows (an
    asynchronous save written no sooner than it stalled), and every ratio equal to the rows'
    quotients."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench_parallel.py"), "--seq-len", "16",
         "--micro-batch", "2", "--micro", "2", "--steps", "1", "--warmup", "1", "--trials", "1",
         "--model.n_layers", "2"],
        env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {m[0]: (int(m[1]), float(m[2]))
            for m in re.findall(r"^(TP1|TP2|PP1|PP2|DP2-none|DP2-post|DP2-overlap)\s+(\d)\s+"
                                r"([\d.]+)\s+[\d,]+$", out.stdout, re.M)}
    names = ("TP1", "TP2", "PP1", "PP2", "DP2-none", "DP2-post", "DP2-overlap")
    assert set(rows) == set(names), out.stdout
    assert [rows[k][0] for k in names] == [1, 2, 1, 2, 2, 2, 2]
    assert all(ms > 0 for _, ms in rows.values())

    def close(ratio: float, slow: float, fast: float) -> bool:
        rounding = slow / fast * (0.05 / slow + 0.05 / fast) + 0.0005  # rows: 0.1 ms
        return abs(ratio - slow / fast) <= rounding

    for layout in ("TP", "PP"):
        ratio = float(re.search(rf"^{layout}2 / {layout}1 step time ([\d.]+)", out.stdout,
                                re.M).group(1))
        assert close(ratio, rows[f"{layout}2"][1], rows[f"{layout}1"][1])
    post, overlap, per_post = map(float, re.search(
        r"^DP2-post / DP2-none step time ([\d.]+), DP2-overlap / DP2-none ([\d.]+), "
        r"DP2-overlap / DP2-post ([\d.]+)", out.stdout, re.M).groups())
    none = rows["DP2-none"][1]
    assert close(post, rows["DP2-post"][1], none)
    assert close(overlap, rows["DP2-overlap"][1], none)
    assert close(per_post, rows["DP2-overlap"][1], rows["DP2-post"][1])
    saves = {m[0]: (float(m[1]), float(m[2]))
             for m in re.findall(r"^(save-sync|save-async)\s+1\s+([\d.]+)\s+([\d.]+)$",
                                 out.stdout, re.M)}
    assert set(saves) == {"save-sync", "save-async"}, out.stdout
    assert saves["save-sync"][0] == saves["save-sync"][1] > 0  # the stall is the whole write
    assert 0 < saves["save-async"][0] <= saves["save-async"][1]
    stall = float(re.search(r"^save-async / save-sync stall ([\d.]+)", out.stdout,
                            re.M).group(1))
    assert close(stall, saves["save-async"][0], saves["save-sync"][0])


def test_format_table_ratios_and_ideals():
    table = format_table({"TP1": 0.1, "TP2": 0.08, "PP1": 0.1, "PP2": 0.07}, 1000, micro=4)
    assert "TP2 / TP1 step time 0.800 (0.500" in table
    assert "PP2 / PP1 step time 0.700 (0.625" in table  # (4 + 1) / (2 * 4)
    assert "TP1                  1       100.0      10,000" in table
    assert "DP2" not in table  # rows and ratios of the layouts measured only
    table = format_table({"DP2-none": 0.1, "DP2-post": 0.12, "DP2-overlap": 0.105}, 1000, 4)
    assert "DP2-overlap          2       105.0      19,048" in table  # two replicas' tokens
    assert ("DP2-post / DP2-none step time 1.200, DP2-overlap / DP2-none 1.050, "
            "DP2-overlap / DP2-post 0.875") in table
    assert "TP2" not in table and "save" not in table
    table = format_table({"save-sync": 0.5, "save-async": 0.04, "save-async-written": 0.6,
                          "save-params": 3.4e7}, 1000, 4)
    assert "checkpoint of 34.0M parameters + AdamW" in table
    assert "save-sync            1       500.0       500.0" in table
    assert "save-async           1        40.0       600.0" in table
    assert "save-async / save-sync stall 0.080 (target on a GPU: <= 0.100)" in table
    assert "layout" not in table and "DP2" not in table


def test_cuda_rows_need_a_gpu_and_the_dp_groups(capsys):
    """``--device cuda`` refuses, in one line, a machine without CUDA and the CPU-only groups."""

    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--groups", "TP,DP"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert "--device cuda times the DP and CKPT groups: give --groups DP,CKPT" in err
    else:
        assert "--device cuda: no CUDA device is visible (use --device cpu)" in err


def test_gpu_check_times_dp_overlap_and_the_save_stall(monkeypatch):
    """tools/gpu_check.sh's bench_parallel line parses: the DP and CKPT groups on CUDA with a
    valid model (the overrides pass the config's validation)."""
    import shlex

    script = open(os.path.join(REPO, "tools", "gpu_check.sh")).read().replace("\\\n", " ")
    line = next(line for line in script.splitlines()
                if line.startswith("timeout") and "tools/bench_parallel.py" in line)
    words = shlex.split(line.split("2>&1")[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args, overrides = parse_args(words[words.index("tools/bench_parallel.py") + 1:])
    assert args.device == "cuda" and args.groups == ["DP", "CKPT"]
    assert "--model.d_model" in overrides
