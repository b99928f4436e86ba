"""Benchmark the fused attention kernel against SDPA and FlexAttention, in one run.

The comparisons (each with the same q, k, v, in the same run):

- ``causal``: the kernel (CAUSAL, no segments, no bias) vs ``sdpa_is_causal`` (torch SDPA with
  ``is_causal=True`` and no mask: its flash path on a GPU) and vs ``flex_block_mask``
  (compiled FlexAttention with a causal block mask).
- ``prefix``: the kernel (one prefix length per row) vs ``sdpa_dense_mask`` (SDPA with a dense
  boolean [batch, 1, len, len] mask) and vs ``flex_block_mask`` (a prefix-LM block mask).
  Masks are built outside the timed call; their build time is its own column (``mask_ms``),
  since a real run builds one per batch.
- ``packed_t5`` (opt-in, ``--modes packed_t5``): rows packing 4 prefix-LM examples, each with
  the T5 relative bias: the kernel (segment ids, per-query prefix, bias in the kernel) vs
  FlexAttention with a block mask and a ``score_mod`` adding the same bias, and vs
  ``kernel_no_bias`` (the same masks without the bias: the fwd_bwd difference is the cost of
  the bias and of its gradient's reduction). Not a target.

Forward (``fwd``) and forward + backward (``fwd_bwd``) for every sequence length and head dim.
TFLOP/s come from an explicit count of visible (query, key) pairs (masked work is not counted):
forward ``4 * batch * heads * head_dim * pairs``, forward + backward 3.5x that
(FlashAttention-2's convention), the same count for every implementation. Each row has its
peak memory (``torch.cuda.max_memory_allocated`` over one call after a reset: inputs, masks and
the call's own memory), the kernel's speed-up over it (``kernel_speedup`` = its ms / the
kernel's ms), and its forward output's relative difference to the kernel's
(``rel_diff_vs_kernel``: the comparison is apples to apples). A call that runs out of memory is
recorded as ``oom``, any other failure as ``error`` with its message, and the run goes on (the
command exits 1 if a kernel row failed). The end prints the three targets (met / not met):
prefix forward+backward >= 1.0x FlexAttention and >= 3x SDPA with a dense mask, causal >= 0.9x
SDPA's flash path (forward and forward+backward). Rows are appended to a CSV (GPU, commit,
date, torch and triton versions) after each case.

``--cpu-small`` runs the same comparison on CPU at small sizes (the kernel through the Triton
interpreter, fp32, one timed call each after one warm-up call for the baselines): it exercises
the tool in CI; its timings mean nothing. FlexAttention has no backward on CPU, so its
forward+backward rows there read ``skipped``.

``--dropout P`` adds ``kernel_dropout`` rows: the kernel with attention dropout P (the MTF
presets use 0.1), whose ``kernel x`` is its time over the p = 0 kernel's (the cost of dropout).

Usage: megarch-bench-attention [--seq-lens 512 1024 2048 4096 8192] [--head-dims 64 128]
           [--modes causal prefix] [--passes fwd fwd_bwd] [--dtype bf16] [--tokens 16384]
           [--hidden 2048] [--csv benchmarks/attention.csv] [--dropout 0.1] [--cpu-small]
       (or python -m kernels.bench ...)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("causal", "prefix")  # the headline comparisons (the default)
EXTRA_MODES = ("packed_t5",)  # opt-in: the study's packed prefix-LM rows with the T5 bias
PACKED_SEGMENTS, T5_BUCKETS, T5_MAX_DISTANCE = 4, 32, 128
PASSES = ("fwd", "fwd_bwd")
BASELINES = {"causal": ("sdpa_is_causal", "flex_block_mask"),
             "prefix": ("sdpa_dense_mask", "flex_block_mask"),
             "packed_t5": ("flex_block_mask", "kernel_no_bias")}
BACKWARD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2's convention)
CPU_SMALL = dict(seq_lens=[40, 72], head_dims=[16, 32], batch=1, heads=2, dtype="fp32")
FIELDS = ("date", "commit", "gpu", "torch", "triton", "mode", "pass", "seq_len", "head_dim",
          "batch", "heads", "dtype", "prefix_len", "impl", "status", "ms", "tflops", "flops",
          "visible_pairs", "peak_mib", "mask_ms", "kernel_speedup", "rel_diff_vs_kernel",
          "tiles", "note")
# (name, mode, pass(es), baseline, minimum kernel speed-up) of the targets on a GPU.
TARGETS = (("prefix fwd+bwd vs FlexAttention", "prefix", ("fwd_bwd",), "flex_block_mask", 1.0),
           ("prefix fwd+bwd vs SDPA dense mask", "prefix", ("fwd_bwd",), "sdpa_dense_mask", 3.0),
           ("causal vs SDPA flash (is_causal)", "causal", PASSES, "sdpa_is_causal", 0.9))


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    return tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                  torch.cuda.OutOfMemoryError})


# ---------------------------------------------------------------------------------------------
# Cases: inputs, FLOP count, the implementations
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmarked shape: inputs [batch, heads, len, head_dim] and the mask's parameters."""

    mode: str  # "causal", "prefix" or "packed_t5"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_len: torch.Tensor | None  # prefix: [batch]; packed_t5: [batch, len] (per query)
    segment_ids: torch.Tensor | None = None  # packed_t5: [batch, len], 1, 2, ...
    positions: torch.Tensor | None = None  # packed_t5: [batch, len] position in its segment
    bias_table: torch.Tensor | None = None  # packed_t5: T5 table [buckets, heads], fp32

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.q.shape)


def packed_segments(seq_len: int) -> list[tuple[int, int]]:
    """(start, length) of the packed_t5 rows' segments: PACKED_SEGMENTS near-equal ones."""
    size = -(-seq_len // PACKED_SEGMENTS)
    return [(start, min(size, seq_len - start)) for start in range(0, seq_len, size)]


def make_case(mode: str, batch: int, heads: int, seq_len: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Case:
    """Random q, k, v and the mode's mask inputs, reproducible by seed.

    prefix: one prefix length per row in [len/4, 3 len/4]. packed_t5: every row packs the same
    segments (``packed_segments``), each a prefix-LM example whose first half is the prefix,
    with T5 bias from a random table over positions within the segment.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_len * 1009 + head_dim)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen)
               .to(device=device, dtype=dtype) for _ in range(3))
    if mode == "prefix":
        prefix = torch.randint(seq_len // 4, 3 * seq_len // 4 + 1, (batch,), generator=gen)
        return Case(mode, q, k, v, prefix.to(device))
    if mode != "packed_t5":
        return Case(mode, q, k, v, None)
    seg, pos, prefix = (torch.empty(seq_len, dtype=torch.long) for _ in range(3))
    for index, (start, length) in enumerate(packed_segments(seq_len)):
        seg[start:start + length] = index + 1
        pos[start:start + length] = torch.arange(length)
        prefix[start:start + length] = start + length // 2
    rows = [t.expand(batch, seq_len).contiguous().to(device) for t in (seg, pos, prefix)]
    table = torch.randn(T5_BUCKETS, heads, generator=gen).to(device)
    return Case(mode, q, k, v, rows[2], segment_ids=rows[0], positions=rows[1], bias_table=table)


def visible_pairs(mode: str, seq_len: int, prefix_len: list[int] | None, batch: int) -> int:
    """(query, key) pairs the mask leaves visible, summed over the batch (closed form).

    Causal: n (n + 1) / 2 per row of length n. Prefix p: queries before p see the p prefix
    keys, query i >= p sees i + 1 keys: p^2 + n (n + 1) / 2 - p (p + 1) / 2. packed_t5: that
    per segment, with p half its length.
    """
    def prefix_lm(n: int, p: int) -> int:
        return p * p + n * (n + 1) // 2 - p * (p + 1) // 2

    if mode == "causal":
        return batch * seq_len * (seq_len + 1) // 2
    if mode == "packed_t5":
        return batch * sum(prefix_lm(n, n // 2) for _, n in packed_segments(seq_len))
    return sum(prefix_lm(seq_len, p) for p in prefix_len)


def attention_flops(pairs: int, heads: int, head_dim: int, bench_pass: str) -> int:
    """FLOPs of one call: two matmuls of 2 * head_dim per visible pair and head (forward)."""
    forward = 4 * heads * head_dim * pairs
    return int(forward * (1 + BACKWARD_FACTOR)) if bench_pass == "fwd_bwd" else forward


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One static compile per shape and mask (the sweep's cases), never the eager fallback that
    # dynamo takes past its recompile limit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device):
    """Compiled FlexAttention on a GPU; on CPU the eager one (forward only there)."""
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    def eager(*args, **kwargs):
        with warnings.catch_warnings():  # the run's header already says it is eager
            warnings.filterwarnings("ignore", message="flex_attention called without")
            return flex_attention(*args, **kwargs)

    return eager


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_build(build: Callable, device: torch.device):
    """(build(), ms of a second build): the first call warms up (tracing, allocator)."""
    build()
    _synchronize(device)
    start = time.perf_counter()
    result = build()
    _synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def dense_prefix_mask(seq_len: int, prefix_len: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, 1, len, len] prefix-LM mask (True = visible) for SDPA."""
    index = torch.arange(seq_len, device=prefix_len.device)
    causal = index[None, :] <= index[:, None]  # [q, k]
    return (causal | (index[None, None, :] < prefix_len[:, None, None]))[:, None]


def flex_block_mask(case: Case):
    """FlexAttention block mask of the case (causal: shared by the batch; others: per row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, _, seq_len, _ = case.shape
    if case.mode == "causal":
        def causal(b, h, i, j):
            return j <= i

        return create_block_mask(causal, None, None, seq_len, seq_len, device=case.q.device)
    prefix, seg = case.prefix_len, case.segment_ids
    if case.mode == "prefix":
        def prefix_lm(b, h, i, j):
            return (j <= i) | (j < prefix[b])
    else:
        def prefix_lm(b, h, i, j):
            return (seg[b, i] == seg[b, j]) & ((j <= i) | (j < prefix[b, i]))

    return create_block_mask(prefix_lm, batch, None, seq_len, seq_len, device=case.q.device)


def t5_score_mod(case: Case, fa):
    """FlexAttention score_mod adding the case's T5 bias, gathered by clamped distance as the
    kernel does (causal bucketing, as the kernel's default for prefix-LM)."""
    table = fa.bias_by_distance(case.bias_table, False, T5_MAX_DISTANCE)  # [heads, 2 R + 1]
    r = fa.bias_range(T5_BUCKETS, T5_MAX_DISTANCE)
    pos = case.positions

    def add_bias(score, b, h, i, j):
        return score + table[h, (pos[b, j] - pos[b, i]).clamp(-r, r) + r]

    return add_bias


def build_impl(impl: str, case: Case, fa, dropout: float = 0.0
               ) -> tuple[Callable, float | None]:
    """(function of (q, k, v) -> out, milliseconds to build its mask, or None without one)."""
    device = case.q.device
    if impl in ("kernel", "kernel_dropout", "kernel_no_bias"):
        mode = fa.CAUSAL if case.mode == "causal" else fa.PREFIX
        kwargs = {"prefix_len": case.prefix_len}
        if impl == "kernel_dropout":
            kwargs.update(dropout_p=dropout, dropout_seed=1234)
        if case.mode == "packed_t5":  # the table gets no gradient: neither does Flex's bias
            kwargs.update(q_segment_ids=case.segment_ids)
            if impl != "kernel_no_bias":  # (the kernel computes the bias gradient regardless)
                kwargs.update(rel_bias_table=case.bias_table, q_positions=case.positions,
                              k_positions=case.positions, num_buckets=T5_BUCKETS,
                              max_distance=T5_MAX_DISTANCE)
        return (lambda q, k, v: fa.flash_attention(q, k, v, mode, **kwargs)), None
    if impl == "sdpa_is_causal":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), None
    if impl == "sdpa_dense_mask":
        mask, build_ms = _timed_build(lambda: dense_prefix_mask(case.shape[2], case.prefix_len),
                                      device)
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), \
            build_ms
    if impl == "flex_block_mask":
        block_mask, build_ms = _timed_build(lambda: flex_block_mask(case), device)
        score_mod = t5_score_mod(case, fa) if case.bias_table is not None else None
        flex = _flex(device)
        return (lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)), \
            build_ms
    raise ValueError(f"unknown implementation {impl!r}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _step(fn: Callable, case: Case, bench_pass: str) -> Callable[[], torch.Tensor]:
    """A zero-argument call: forward, or forward + backward into fresh gradients."""
    if bench_pass == "fwd":
        def forward():
            with torch.no_grad():
                return fn(case.q, case.k, case.v)
        return forward
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    grad_out = torch.randn_like(case.q)

    def forward_backward():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad_out)
        return out

    return forward_backward


def measure(step: Callable, device: torch.device, warmup: bool
            ) -> tuple[float, float | None, torch.Tensor]:
    """(mean ms of one call, peak MiB during one call after a reset (None on CPU), an output).

    CPU: one timed call (after one warm-up call if asked). GPU: a warm-up call (compiling and
    autotuning happen there), one call for the peak memory, then ``triton.testing.do_bench``.
    """
    if warmup or device.type == "cuda":
        step()
    if device.type != "cuda":
        start = time.perf_counter()
        out = step()
        return (time.perf_counter() - start) * 1e3, None, out.detach()
    from triton.testing import do_bench

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step().detach()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return do_bench(step, warmup=25, rep=100), peak, out


def _measure_pass(fn: Callable, case: Case, bench_pass: str, warmup: bool):
    return measure(_step(fn, case, bench_pass), case.q.device, warmup)


def relative_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# One case: every implementation, both passes
# ---------------------------------------------------------------------------------------------


def _tiles(fa, case: Case) -> str:
    mode = fa.CAUSAL if case.mode == "causal" else fa.PREFIX
    packed = case.mode == "packed_t5"
    configs = fa.selected_block_configs(case.q, case.shape[2], mode, has_segments=packed,
                                        has_bias=packed)
    return " ".join(f"{kernel}={c.block_m}x{c.block_n}x{c.num_warps}x{c.num_stages}"
                    for kernel, c in configs.items())


def _attempt(device: torch.device, call: Callable, *args) -> tuple[object, str, str]:
    """(call(*args), "ok", "") or (None, "oom" / "error", why): no failure ends the run."""
    failure = None
    try:
        return call(*args), "ok", ""
    except _out_of_memory_errors():
        failure = ("oom", "")
    except Exception as error:  # noqa: BLE001 - e.g. a baseline this torch cannot compile
        lines = str(error).strip().splitlines() or [""]
        failure = ("error", f"{type(error).__name__}: {lines[0][:160]}")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # after the except block: its traceback held the tensors
    return None, *failure


def run_case(case: Case, passes: list[str], fa, base_row: dict,
             dropout: float = 0.0) -> list[dict]:
    """Rows for the kernel and the case's baselines, forward and/or forward + backward; with
    ``dropout`` > 0 also ``kernel_dropout`` rows (the kernel with attention dropout: its
    ``kernel x`` column is its time over the p = 0 kernel's, e.g. 1.15 = dropout costs 15%)."""
    device = case.q.device
    batch, heads, seq_len, head_dim = case.shape
    prefix = case.prefix_len.tolist() if case.mode == "prefix" else None
    pairs = visible_pairs(case.mode, seq_len, prefix, batch)
    rows, kernel_out, kernel_ms = [], None, {}
    extra = ("kernel_dropout",) if dropout > 0 else ()
    for impl in ("kernel", *BASELINES[case.mode], *extra):
        row = {**base_row, "mode": case.mode, "seq_len": seq_len, "head_dim": head_dim,
               "batch": batch, "heads": heads, "impl": impl, "visible_pairs": pairs,
               "prefix_len": ";".join(map(str, prefix)) if prefix else ""}
        built, status, note = _attempt(device, build_impl, impl, case, fa, dropout)
        if built is None:
            rows += [{**row, "pass": p, "status": status, "note": f"building the mask {note}"
                      .strip()} for p in passes]
            continue
        fn, mask_ms = built
        out = None
        for bench_pass in passes:
            result = {**row, "pass": bench_pass,
                      "flops": attention_flops(pairs, heads, head_dim, bench_pass),
                      "mask_ms": "" if mask_ms is None else f"{mask_ms:.3f}"}
            if (device.type != "cuda" and impl == "flex_block_mask"
                    and bench_pass == "fwd_bwd"):
                rows.append({**result, "status": "skipped",
                             "note": "FlexAttention has no backward on CPU"})
                continue
            # The interpreted kernel needs no warm-up call (nothing to compile).
            measured, status, note = _attempt(device, _measure_pass, fn, case, bench_pass,
                                              not impl.startswith("kernel"))
            if measured is None:
                rows.append({**result, "status": status, "note": note})
                continue
            ms, peak, last = measured
            # Kept on the host: a held output would count in the next calls' peak memory.
            out = last.cpu() if out is None else out
            del last, measured
            if impl == "kernel":
                kernel_out = out if kernel_out is None else kernel_out
                kernel_ms[bench_pass] = ms
                result["tiles"] = _tiles(fa, case)
            elif bench_pass in kernel_ms:
                result["kernel_speedup"] = f"{ms / kernel_ms[bench_pass]:.4g}"
            if impl == "kernel_dropout":
                result["note"] = f"dropout p={dropout} (a different function: no diff)"
            elif impl == "kernel_no_bias":
                result["note"] = ("the kernel without the T5 bias: kernel ms - this = the "
                                  "bias's cost (fwd_bwd: its gradient reduction included)")
            elif kernel_out is not None:
                result["rel_diff_vs_kernel"] = f"{relative_difference(out, kernel_out):.2e}"
            rows.append({**result, "status": "ok", "ms": f"{ms:.6g}",
                         "tflops": f"{result['flops'] / ms / 1e9:.4g}",
                         "peak_mib": "" if peak is None else f"{peak:.1f}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Output: table, targets, CSV
# ---------------------------------------------------------------------------------------------


HEADER = (f"{'mode':7} {'pass':7} {'len':>6} {'d':>4} {'impl':16} {'ms':>10} {'TFLOP/s':>8} "
          f"{'peak MiB':>9} {'mask ms':>8} {'kernel x':>8}  status")


def format_row(row: dict) -> str:
    def get(name):
        return row.get(name) or "-"

    return (f"{row['mode']:7} {row['pass']:7} {row['seq_len']:>6} {row['head_dim']:>4} "
            f"{row['impl']:16} {get('ms'):>10} {get('tflops'):>8} {get('peak_mib'):>9} "
            f"{get('mask_ms'):>8} {get('kernel_speedup'):>8}  {row['status']}"
            + (f" ({row['note']})" if row.get("note") else ""))


def target_summary(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, "met" / "not met" / "not measured", detail) for each of the issue's targets.

    A target is met when the kernel's speed-up over the baseline reaches the bound at every
    measured length and head dim of its pass(es); a baseline that ran out of memory counts as
    beaten; a failed kernel row counts as not met.
    """
    summary = []
    for name, mode, passes, baseline, bound in TARGETS:
        points = [r for r in rows if r["mode"] == mode and r["pass"] in passes
                  and r["impl"] in ("kernel", baseline)]
        worst, failed = None, []
        by_point: dict[tuple, dict] = {}
        for r in points:
            by_point.setdefault((r["pass"], r["seq_len"], r["head_dim"]), {})[r["impl"]] = r
        for point, pair in sorted(by_point.items()):
            kernel, base = pair.get("kernel"), pair.get(baseline)
            if kernel is None or base is None or base["status"] == "skipped":
                continue
            if kernel["status"] != "ok":
                failed.append(f"kernel {kernel['status']} at {point}")
            elif base["status"] == "oom":
                continue
            elif base["status"] == "ok":
                speedup = float(base["kernel_speedup"])
                if worst is None or speedup < worst[0]:
                    worst = (speedup, point)
        if worst is None and not failed:
            summary.append((name, "not measured", ""))
            continue
        met = not failed and (worst is None or worst[0] >= bound)
        detail = f"need >= {bound:.1f}x"
        if worst is not None:
            detail += f", worst {worst[0]:.3g}x at (pass, len, d) = {worst[1]}"
        if failed:
            detail += "; " + "; ".join(failed)
        summary.append((name, "met" if met else "not met", detail))
    return summary


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows (header first in a new file) through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    if existing:
        header = existing.splitlines()[0].split(",")
        if header != list(FIELDS):
            raise SystemExit(f"{path}: its columns ({','.join(header)[:60]}...) are not this "
                             "benchmark's; pass --csv with a new file or move the old one away")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        handle.write(existing)
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if not existing:
            writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    """GPU name, commit, date and versions for every CSV row."""
    import triton

    commit = ""
    for cwd in (Path.cwd(), Path(__file__).resolve().parents[1]):
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            break
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megarch-bench-attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        help="sequence lengths (default 512 1024 2048 4096 8192)")
    parser.add_argument("--head-dims", type=int, nargs="+", help="head dims (default 64 128)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + EXTRA_MODES,
                        help="causal prefix (default); packed_t5 adds packed prefix-LM rows with "
                             "the T5 bias (kernel vs FlexAttention with a score_mod)")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 (CPU: fp32)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="tokens per batch: batch = max(1, tokens // seq_len)")
    parser.add_argument("--hidden", type=int, default=2048,
                        help="model width: heads = hidden // head_dim")
    parser.add_argument("--batch", type=int, help="fixed batch size (overrides --tokens)")
    parser.add_argument("--heads", type=int, help="fixed head count (overrides --hidden)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="also time the kernel with this attention dropout (its cost)")
    parser.add_argument("--csv", type=Path,
                        help="CSV to append to (default benchmarks/attention.csv, "
                             "benchmarks/attention_cpu.csv with --cpu-small)")
    parser.add_argument("--cpu-small", action="store_true",
                        help="the same comparison on CPU at small sizes (Triton interpreter)")
    args = parser.parse_args(argv)
    small = args.cpu_small
    args.seq_lens = args.seq_lens or (CPU_SMALL["seq_lens"] if small
                                      else [512, 1024, 2048, 4096, 8192])
    args.head_dims = args.head_dims or (CPU_SMALL["head_dims"] if small else [64, 128])
    args.dtype = args.dtype or (CPU_SMALL["dtype"] if small else "bf16")
    if small:
        args.batch = args.batch or CPU_SMALL["batch"]
        args.heads = args.heads or CPU_SMALL["heads"]
    args.csv = args.csv or Path("benchmarks", "attention_cpu.csv" if small else "attention.csv")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout {args.dropout}: must be in [0, 1)")
    for name in ("seq_lens", "head_dims"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if small and args.dtype == "bf16":
        parser.error("--cpu-small: the Triton interpreter mis-computes bf16; use fp32 or fp16")
    if not small and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; --cpu-small runs the same comparison on CPU at small "
                     "sizes")
    return args


def _import_kernel(cpu: bool):
    """kernels.flash_attention, interpreted on CPU, compiled on a GPU (checked)."""
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
    from kernels import flash_attention as fa

    if cpu and not fa._interpreting():
        raise SystemExit("--cpu-small: kernels.flash_attention was imported in this process "
                         "without TRITON_INTERPRET=1; run the benchmark in a fresh process")
    if not cpu and fa._interpreting():
        raise SystemExit("unset TRITON_INTERPRET: the GPU benchmark needs compiled kernels")
    return fa


def run(args: argparse.Namespace) -> list[dict]:
    """Benchmark every case; print rows as they come and append them to the CSV per case."""
    device = torch.device("cpu" if args.cpu_small else "cuda")
    fa = _import_kernel(args.cpu_small)
    base = {**environment(device), "dtype": args.dtype}
    print(f"{base['gpu']} | torch {base['torch']} | triton {base['triton']} | {args.dtype} | "
          f"commit {base['commit'] or '?'}")
    if args.cpu_small:
        print("CPU: the kernel runs in the Triton interpreter and FlexAttention eagerly, "
              "forward only (no FlexAttention backward on CPU); timings mean nothing here")
    print(HEADER, flush=True)
    rows = []
    for head_dim in args.head_dims:
        heads = args.heads or max(1, args.hidden // head_dim)
        for seq_len in args.seq_lens:
            batch = args.batch or max(1, args.tokens // seq_len)
            for mode in args.modes:
                case = make_case(mode, batch, heads, seq_len, head_dim, DTYPES[args.dtype],
                                 device, args.seed)
                case_rows = run_case(case, args.passes, fa, base, args.dropout)
                for row in case_rows:
                    print(format_row(row), flush=True)
                append_csv(args.csv, case_rows)
                rows += case_rows
                del case
    print(f"appended {len(rows)} rows to {args.csv}")
    print("targets (kernel speed-up over the baseline, every length and head dim):")
    for name, status, detail in target_summary(rows):
        if args.cpu_small:
            status = f"n/a on CPU (would read: {status})"
        print(f"  {name:36} {status}  {detail}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a kernel row failed (a failing baseline is only reported)."""
    rows = run(parse_args(argv))
    failed = [r for r in rows
              if r["impl"].startswith("kernel") and r["status"] not in ("ok", "oom")]
    for row in failed:
        print(f"kernel failed: {row['mode']} {row['pass']} len {row['seq_len']} "
              f"d {row['head_dim']}: {row.get('note', '')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
