"""tools/bench_parallel.py at its smallest size: the table's rows and ratios are printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.training.helpers import REPO
from tools.bench_parallel import format_table


def test_bench_parallel_prints_rows_and_ratios():
    """Real gloo processes: every layout's row with a positive time, and both ratios equal to
    the rows' quotients."""
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
    assert "TP2" not in table
