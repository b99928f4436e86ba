#!/usr/bin/env python3
"""Benchmark the fused attention kernel against torch SDPA and FlexAttention in the same run.

For each mask mode and sequence length it times forward, or forward + backward, of:

- ``triton``: kernels.flash_attention (mask from segment ids / prefix, T5 bias in the kernel);
- ``sdpa``: torch.nn.functional.scaled_dot_product_attention with the mask and bias
  materialised as one additive [batch, heads, q, k] tensor (built outside the timing);
- ``flex``: torch.compile'd FlexAttention with a block mask and a bias score_mod.

TFLOP/s count only visible (query, key) pairs: forward 4 * heads * head_dim * pairs, backward
2.5x the forward (FlashAttention-2's convention), the same for every implementation. Each row's
ratio is to the named baseline measured in the same run. Rows are printed and appended to a CSV
with the GPU, commit and date.

Usage: python tools/bench_flash_attention.py [--modes causal prefix] [--seq-lens 1024 2048]
           [--batch 8] [--heads 16] [--head-dim 64] [--dtype bf16] [--segments 4] [--no-bias]
           [--backward] [--baseline sdpa] [--impls triton sdpa flex] [--csv PATH]
       --smoke runs one tiny case on CPU through the Triton interpreter (checks the tool only).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import flash_attention as fa  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = {name: mode for mode, name in fa.MODE_NAMES.items()}
BUCKETS, MAX_DISTANCE = 32, 128


def make_case(mode: int, batch: int, heads: int, length: int, head_dim: int, dtype, device,
              n_segments: int, bias: bool, grad: bool) -> tuple:
    """Random q, k, v and the flash_attention keyword arguments for one benchmark case."""
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype,
                           requires_grad=grad) for _ in range(3))
    kwargs = {}
    index = torch.arange(length, device=device)
    seg_len = -(-length // n_segments)
    seg = (index // seg_len + 1).expand(batch, length).contiguous()  # packed equal segments
    start = (seg - 1) * seg_len
    if n_segments > 1:
        kwargs["q_segment_ids"] = seg
        if mode == fa.CROSS:
            kwargs["k_segment_ids"] = seg
    if mode == fa.PREFIX:
        kwargs["prefix_len"] = start + seg_len // 2  # each segment: first half is the prefix
    if bias:
        kwargs["rel_bias_table"] = torch.randn(BUCKETS, heads, device=device,
                                               requires_grad=grad)
        kwargs["q_positions"] = kwargs["k_positions"] = index - start
    return q, k, v, kwargs


def visible_pairs(mode: int, length: int, kwargs: dict, device) -> torch.Tensor:
    """Boolean [batch or 1, q, k] mask of the case (the reference's rules)."""
    return fa.attention_mask_ref(mode, length, length, kwargs.get("q_segment_ids"),
                                 kwargs.get("k_segment_ids"), kwargs.get("prefix_len"),
                                 device=device)


def sdpa_fn(mode, q, k, v, kwargs):
    """SDPA with the mask and T5 bias materialised once, outside the timed call."""
    mask = visible_pairs(mode, q.shape[2], kwargs, q.device)[:, None]  # [b|1, 1, q, k]
    additive = torch.zeros(mask.shape, device=q.device, dtype=q.dtype)
    additive = additive.masked_fill(~mask, float("-inf"))
    if "rel_bias_table" in kwargs:
        relative = kwargs["k_positions"][:, None, :] - kwargs["q_positions"][:, :, None]
        buckets = fa.relative_position_bucket(relative, mode in (fa.BIDIRECTIONAL, fa.CROSS),
                                              BUCKETS, MAX_DISTANCE)
        bias = kwargs["rel_bias_table"][buckets].permute(0, 3, 1, 2).to(q.dtype)
        additive = additive + bias  # [batch, heads, q, k]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)


def flex_fn(mode, q, k, v, kwargs):
    """Compiled FlexAttention: a block mask from the same rules and a bias score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, _, length, _ = q.shape
    seg = kwargs.get("q_segment_ids")
    prefix = kwargs.get("prefix_len")

    def mask_mod(b, h, i, j):
        visible = j >= 0
        if mode == fa.CAUSAL:
            visible = j <= i
        elif mode == fa.PREFIX:
            visible = (j <= i) | (j < prefix[b, i])
        if seg is not None:
            visible = visible & (seg[b, i] == seg[b, j])
        return visible

    block_mask = create_block_mask(mask_mod, batch, None, length, length, device=q.device)
    score_mod = None
    if "rel_bias_table" in kwargs:
        table = fa.bias_by_distance(kwargs["rel_bias_table"], mode in (fa.BIDIRECTIONAL,
                                                                        fa.CROSS), MAX_DISTANCE)
        r = fa.bias_range(BUCKETS, MAX_DISTANCE)
        pos = kwargs["q_positions"]

        def score_mod(score, b, h, i, j):
            return score + table[h, (pos[b, j] - pos[b, i]).clamp(-r, r) + r]

    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


def triton_fn(mode, q, k, v, kwargs):
    return lambda: fa.flash_attention(q, k, v, mode, **kwargs)


IMPLS = {"triton": triton_fn, "sdpa": sdpa_fn, "flex": flex_fn}


def time_ms(fn, backward: bool, device) -> float:
    """Mean milliseconds of one call (forward, or forward + backward)."""
    grad = None

    def step():
        nonlocal grad
        out = fn()
        if backward:
            grad = torch.ones_like(out) if grad is None else grad
            out.backward(grad)

    if device.type != "cuda":  # --smoke: one interpreted call, only to exercise the path
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(step, warmup=10, rep=50)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["causal", "prefix", "bidirectional"],
                        choices=sorted(MODES))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--segments", type=int, default=1, help="packed segments per row")
    parser.add_argument("--no-bias", action="store_true", help="without the T5 relative bias")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--impls", nargs="+", default=["triton", "sdpa", "flex"],
                        choices=sorted(IMPLS))
    parser.add_argument("--baseline", default="sdpa", choices=sorted(IMPLS))
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "flash_attention.csv"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run through the Triton interpreter (tests the tool)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.batch, args.heads, args.head_dim = [40], 1, 2, 16
        args.dtype, args.impls = "fp32", [i for i in args.impls if i != "flex"]
        args.baseline = args.impls[-1]
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = environment()
    rows = []
    print(f"{'mode':14} {'len':>6} {'impl':8} {'ms':>9} {'TFLOP/s':>8} {'vs ' + args.baseline:>9}")
    for mode_name, length in ((m, n) for m in args.modes for n in args.seq_lens):
        mode = MODES[mode_name]
        q, k, v, kwargs = make_case(mode, args.batch, args.heads, length, args.head_dim,
                                    DTYPES[args.dtype], device, args.segments,
                                    not args.no_bias, args.backward)
        mask = visible_pairs(mode, length, kwargs, device)  # [batch or 1, q, k]
        pairs = int(mask.sum()) * (args.batch if mask.shape[0] == 1 else 1)
        flops = 4 * args.heads * args.head_dim * pairs * (3.5 if args.backward else 1.0)
        timings = {}
        for impl in args.impls:
            try:
                timings[impl] = time_ms(IMPLS[impl](mode, q, k, v, kwargs), args.backward,
                                        device)
            except Exception as error:  # a baseline that cannot run this case: say so
                print(f"{mode_name:14} {length:>6} {impl:8} failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:100]}")
        for impl, ms in timings.items():
            base = timings.get(args.baseline)
            ratio = base / ms if base else float("nan")
            tflops = flops / ms / 1e9
            print(f"{mode_name:14} {length:>6} {impl:8} {ms:>9.3f} {tflops:>8.1f} {ratio:>8.2f}x")
            rows.append({**env, "mode": mode_name, "seq_len": length, "batch": args.batch,
                         "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
                         "segments": args.segments, "bias": not args.no_bias,
                         "backward": args.backward, "impl": impl, "ms": f"{ms:.4f}",
                         "tflops": f"{tflops:.2f}", "baseline": args.baseline,
                         "speedup_vs_baseline": f"{ratio:.3f}"})
    if rows and not args.smoke:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
