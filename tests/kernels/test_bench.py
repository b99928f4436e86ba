"""The attention benchmark's CPU comparison (kernel through the interpreter, SDPA, FlexAttention).

Runs ``megarch-bench-attention --cpu-small`` in this process (TRITON_INTERPRET=1 comes from
tests/conftest.py) and checks what it printed and appended: every row's FLOP count against an
independent count of visible pairs from the kernel file's mask reference, and the three
implementations' outputs on the benched inputs against the float64 reference. The targets
summary and the CSV's append rules are checked on recorded rows.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

import kernels.flash_attention as fa
from kernels import bench

REPO = Path(__file__).resolve().parents[2]


def _independent_flops(row: dict) -> int:
    """4 * heads * head_dim per visible pair (x3.5 forward + backward), pairs from the mask."""
    length, batch = int(row["seq_len"]), int(row["batch"])
    if row["mode"] == "causal":
        mask = fa.attention_mask_ref(fa.CAUSAL, length, length)  # [1, q, k]
        pairs = int(mask.sum()) * batch
    else:
        prefix = torch.tensor([int(p) for p in row["prefix_len"].split(";")])
        assert len(prefix) == batch
        pairs = int(fa.attention_mask_ref(fa.PREFIX, length, length, prefix_len=prefix).sum())
    forward = 4 * int(row["heads"]) * int(row["head_dim"]) * pairs
    return forward * 7 // 2 if row["pass"] == "fwd_bwd" else forward


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One --cpu-small run (two lengths, one head dim, both modes and passes)."""
    path = tmp_path_factory.mktemp("bench") / "attention.csv"
    args = bench.parse_args(["--cpu-small", "--head-dims", "16", "--csv", str(path)])
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = bench.run(args)
    with path.open() as handle:
        parsed = list(csv.DictReader(handle))
    return rows, parsed, out.getvalue()


def test_rows_parse_and_count_visible_pairs(cpu_run):
    rows, parsed, printed = cpu_run
    assert len(parsed) == len(rows) == 2 * 2 * 2 * 3  # lengths x modes x passes x impls
    assert list(parsed[0]) == list(bench.FIELDS)
    impls = {(r["mode"], r["impl"]) for r in parsed}
    assert impls == {("causal", "kernel"), ("causal", "sdpa_is_causal"),
                     ("causal", "flex_block_mask"), ("prefix", "kernel"),
                     ("prefix", "sdpa_dense_mask"), ("prefix", "flex_block_mask")}
    for row in parsed:
        assert row["gpu"] == "cpu-interpreter" and row["torch"] == torch.__version__
        assert int(row["flops"]) == _independent_flops(row), row
        if row["impl"] == "flex_block_mask" and row["pass"] == "fwd_bwd":
            assert row["status"] == "skipped" and "no backward on CPU" in row["note"]
            continue
        assert row["status"] == "ok", row
        ms, tflops = float(row["ms"]), float(row["tflops"])
        assert ms > 0 and tflops == pytest.approx(int(row["flops"]) / ms / 1e9, rel=1e-3)
        # Forward outputs on the same inputs agree (fp32: only rounding differs).
        assert float(row["rel_diff_vs_kernel"]) < 1e-5, row
        if row["impl"] != "kernel":
            assert float(row["kernel_speedup"]) > 0
        if row["impl"] in ("sdpa_dense_mask", "flex_block_mask"):
            assert float(row["mask_ms"]) >= 0
        if row["impl"] == "kernel":
            assert re.fullmatch(r"fwd=32x32x4x2 dkdv=32x32x4x2 dq=32x32x4x2", row["tiles"])

    # The printed table: a header, one line per row with its numbers, then the targets.
    lines = printed.splitlines()
    assert bench.HEADER in lines
    for row in parsed:
        pattern = (rf"^{row['mode']}\s+{row['pass']}\s+{row['seq_len']}\s+{row['head_dim']}\s+"
                   rf"{row['impl']}\s+{re.escape(row['ms'] or '-')}\s+"
                   rf"{re.escape(row['tflops'] or '-')}\s.*{row['status']}")
        assert sum(bool(re.match(pattern, line)) for line in lines) == 1, pattern
    for name, *_ in bench.TARGETS:
        assert any(line.strip().startswith(name) and "n/a on CPU" in line for line in lines)
    assert "forward only" in printed


def test_benched_inputs_agree_with_the_float64_reference(cpu_run):
    """The three implementations compute the same attention on a benched prefix case."""
    _, parsed, _ = cpu_run
    row = next(r for r in parsed if r["mode"] == "prefix" and r["seq_len"] == "72")
    case = bench.make_case("prefix", int(row["batch"]), int(row["heads"]), 72, 16,
                           torch.float32, "cpu", seed=0)
    assert ";".join(map(str, case.prefix_len.tolist())) == row["prefix_len"]  # same inputs
    ref = fa.flash_attention_ref(case.q.double(), case.k.double(), case.v.double(), fa.PREFIX,
                                 prefix_len=case.prefix_len)
    for impl in ("kernel", "sdpa_dense_mask", "flex_block_mask"):
        fn, _ = bench.build_impl(impl, case, fa)
        with torch.no_grad():
            out = fn(case.q, case.k, case.v)
        assert bench.relative_difference(out, ref) < 1e-5, impl


def _row(mode, bench_pass, impl, status="ok", speedup=None, length=1024, head_dim=64):
    return {"mode": mode, "pass": bench_pass, "impl": impl, "status": status,
            "seq_len": length, "head_dim": head_dim,
            "kernel_speedup": "" if speedup is None else str(speedup)}


def test_target_summary():
    rows = [
        _row("prefix", "fwd_bwd", "kernel"),
        _row("prefix", "fwd_bwd", "flex_block_mask", speedup=1.3),
        _row("prefix", "fwd_bwd", "sdpa_dense_mask", speedup=4.0),
        _row("prefix", "fwd_bwd", "kernel", length=8192),
        _row("prefix", "fwd_bwd", "flex_block_mask", speedup=0.95, length=8192),
        _row("prefix", "fwd_bwd", "sdpa_dense_mask", status="oom", length=8192),
        _row("prefix", "fwd", "flex_block_mask", speedup=0.1),  # forward: not a target
        _row("causal", "fwd", "kernel"),
        _row("causal", "fwd", "sdpa_is_causal", speedup=0.92),
    ]
    summary = {name: (status, detail) for name, status, detail in bench.target_summary(rows)}
    flex, dense, causal = (summary[name] for name, *_ in bench.TARGETS)
    assert flex[0] == "not met" and "worst 0.95x" in flex[1] and "8192" in flex[1]
    assert dense[0] == "met" and "worst 4x" in dense[1]  # the oom baseline counts as beaten
    assert causal[0] == "met"
    rows.append(_row("causal", "fwd_bwd", "kernel", status="oom"))
    rows.append(_row("causal", "fwd_bwd", "sdpa_is_causal", speedup=None))
    causal = dict((n, s) for n, s, _ in bench.target_summary(rows))[bench.TARGETS[2][0]]
    assert causal == "not met"
    assert all(s == "not measured" for _, s, _ in bench.target_summary([]))


def test_csv_appends_and_refuses_other_columns(tmp_path):
    path = tmp_path / "sub" / "attention.csv"
    row = dict.fromkeys(bench.FIELDS, "x")
    bench.append_csv(path, [row])
    bench.append_csv(path, [{**row, "impl": "y"}])
    with path.open() as handle:
        assert [r["impl"] for r in csv.DictReader(handle)] == ["x", "y"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["attention.csv"]  # no temp left
    old = tmp_path / "old.csv"
    old.write_text("date,commit,gpu,mode\n1,2,3,4\n")
    with pytest.raises(SystemExit, match="old.csv.*--csv"):
        bench.append_csv(old, [row])
    assert old.read_text() == "date,commit,gpu,mode\n1,2,3,4\n"


def test_console_script_and_wrapper_point_at_the_benchmark():
    assert "megarch-bench-attention=kernels.bench:main" in (REPO / "setup.py").read_text()
    wrapper = (REPO / "tools" / "bench_flash_attention.py").read_text()
    assert "from kernels.bench import main" in wrapper
    with pytest.raises(SystemExit) as exit_info:  # --help parses and exits 0
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_gpu_check_runs_the_full_comparison(monkeypatch):
    """tools/gpu_check.sh's benchmark line parses, with both modes, passes and head dims."""
    import shlex

    script = (REPO / "tools" / "gpu_check.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if "-m kernels.bench" in line)
    words = shlex.split(line.split("2>&1")[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = bench.parse_args(words[words.index("kernels.bench") + 1:])
    assert args.modes == ["causal", "prefix"] and args.passes == ["fwd", "fwd_bwd"]
    assert args.head_dims == [64, 128] and max(args.seq_lens) == 8192
    assert args.dtype == "bf16" and not args.cpu_small


def test_out_of_memory_is_recorded_and_the_run_goes_on(monkeypatch):
    """A baseline whose mask or call runs out of memory reads "oom"; the others still run."""
    real_build = bench.build_impl

    def build(impl, case, fa_module, dropout=0.0):
        if impl == "sdpa_dense_mask":
            raise torch.OutOfMemoryError("CUDA out of memory (mask)")
        fn, mask_ms = real_build(impl, case, fa_module, dropout)
        if impl == "flex_block_mask":
            def fn(q, k, v):
                raise torch.OutOfMemoryError("CUDA out of memory (call)")
        return fn, mask_ms

    monkeypatch.setattr(bench, "build_impl", build)
    case = bench.make_case("prefix", 1, 1, 40, 16, torch.float32, "cpu")
    rows = bench.run_case(case, ["fwd"], fa, {"dtype": "fp32"})
    status = {row["impl"]: (row["status"], row.get("note", "")) for row in rows}
    assert status == {"kernel": ("ok", ""), "sdpa_dense_mask": ("oom", "building the mask"),
                      "flex_block_mask": ("oom", "")}


def test_a_failing_kernel_is_recorded_and_fails_the_command(monkeypatch, tmp_path, capsys):
    real_build = bench.build_impl

    def build(impl, case, fa_module, dropout=0.0):
        fn, mask_ms = real_build(impl, case, fa_module, dropout)
        if impl == "kernel":
            def fn(q, k, v):
                raise RuntimeError("PTX failed to assemble\nsecond line")
        return fn, mask_ms

    monkeypatch.setattr(bench, "build_impl", build)
    path = tmp_path / "a.csv"
    code = bench.main(["--cpu-small", "--seq-lens", "40", "--head-dims", "16", "--modes",
                       "causal", "--passes", "fwd", "--csv", str(path)])
    assert code == 1
    with path.open() as handle:
        rows = {row["impl"]: row for row in csv.DictReader(handle)}
    assert rows["kernel"]["status"] == "error"
    assert rows["kernel"]["note"] == "RuntimeError: PTX failed to assemble"
    baseline = rows["sdpa_is_causal"]
    assert baseline["status"] == "ok" and baseline["kernel_speedup"] == ""
    assert "kernel failed: causal fwd len 40 d 16" in capsys.readouterr().err


def test_packed_t5_rows_count_pairs_and_match_the_reference():
    """The opt-in packed prefix-LM + T5 bias comparison: FLOPs from the reference mask of the
    case's own segments and prefixes; kernel and FlexAttention (score_mod) against float64."""
    case = bench.make_case("packed_t5", 2, 2, 41, 16, torch.float32, "cpu")
    assert case.segment_ids.unique().tolist() == [1, 2, 3, 4]
    rows = bench.run_case(case, ["fwd"], fa, {"dtype": "fp32"})
    assert [(r["impl"], r["status"]) for r in rows] == [("kernel", "ok"),
                                                        ("flex_block_mask", "ok"),
                                                        ("kernel_no_bias", "ok")]
    assert "without the T5 bias" in rows[2]["note"] and "kernel_speedup" in rows[2]
    mask = fa.attention_mask_ref(fa.PREFIX, 41, 41, q_segment_ids=case.segment_ids,
                                 prefix_len=case.prefix_len)
    assert rows[0]["visible_pairs"] == int(mask.sum())
    assert rows[0]["flops"] == 4 * 2 * 16 * int(mask.sum())
    ref = fa.flash_attention_ref(case.q.double(), case.k.double(), case.v.double(), fa.PREFIX,
                                 q_segment_ids=case.segment_ids, prefix_len=case.prefix_len,
                                 rel_bias_table=case.bias_table.double(),
                                 q_positions=case.positions, k_positions=case.positions)
    for impl in ("kernel", "flex_block_mask"):
        fn, _ = bench.build_impl(impl, case, fa)
        with torch.no_grad():
            assert bench.relative_difference(fn(case.q, case.k, case.v), ref) < 1e-5, impl
    # the bias-free row: the same masks, no bias (against the reference without one)
    ref = fa.flash_attention_ref(case.q.double(), case.k.double(), case.v.double(), fa.PREFIX,
                                 q_segment_ids=case.segment_ids, prefix_len=case.prefix_len)
    fn, _ = bench.build_impl("kernel_no_bias", case, fa)
    with torch.no_grad():
        assert bench.relative_difference(fn(case.q, case.k, case.v), ref) < 1e-5


def test_dropout_rows_time_the_kernel_with_dropout(monkeypatch):
    """--dropout adds kernel_dropout rows: their time relative to the p = 0 kernel's, and an
    output that is the kernel's own with the dropout mask (checked at p -> its mask)."""
    import kernels.flash_attention as fa

    case = bench.make_case("prefix", 1, 2, 40, 16, torch.float32, torch.device("cpu"), 0)
    rows = bench.run_case(case, ["fwd"], fa, {"dtype": "fp32"}, dropout=0.25)
    (row,) = [r for r in rows if r["impl"] == "kernel_dropout"]
    (kernel,) = [r for r in rows if r["impl"] == "kernel"]
    assert row["status"] == "ok" and row["note"].startswith("dropout p=0.25")
    assert float(row["kernel_speedup"]) == pytest.approx(float(row["ms"]) / float(kernel["ms"]),
                                                         rel=1e-3)
    fn, _ = bench.build_impl("kernel_dropout", case, fa, 0.25)
    mask = fa.dropout_mask(1234, (*case.q.shape[:3], case.k.shape[2]), 0.25)
    want = fa.flash_attention_ref(case.q, case.k, case.v, fa.PREFIX, prefix_len=case.prefix_len,
                                  dropout_p=0.25, dropout_mask=mask)
    torch.testing.assert_close(fn(case.q, case.k, case.v), want.to(case.q.dtype),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu-small", "--dropout", "1.0"])
