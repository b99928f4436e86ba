"""GPU-scale shapes: int64 batch/head offsets and the folded launch grid.

At batch x heads >= 2,048 with length 8192 and head dim 128 a (batch, head) offset passes 2**31
elements, and CUDA caps grid axes 1 and 2 at 65,535: neither shows at the interpreter's small
shapes, so the pieces are tested one by one: the offset helper and the grid unfolding through
the interpreter (int32 wraps there as on a GPU), the launcher's grids with kernels replaced by
recorders (meta tensors: nothing allocated), and a compile for sm_80 whose TTGIR holds the
64-bit multiplies.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from kernels.flash_attention import CAUSAL, PREFIX, default_block_configs, launcher
from kernels.flash_attention.masks import _head_offset, _program_ids

REPO = Path(__file__).resolve().parents[2]


@triton.jit
def _offset_probe(OUT, b, h, stride_b, stride_h):
    tl.store(OUT, _head_offset(b, h, stride_b, stride_h))


@triton.jit
def _program_ids_probe(OUT, length, n_heads, BLOCK: tl.constexpr):
    block, pid_bh, b, h = _program_ids(length, n_heads, BLOCK)
    base = OUT + tl.program_id(0) * 4
    tl.store(base, block)
    tl.store(base + 1, pid_bh)
    tl.store(base + 2, b)
    tl.store(base + 3, h)


@pytest.mark.parametrize("b, h", [(100, 31), (2047, 7), (5, 3)])
def test_head_offset_does_not_wrap(b, h):
    """batch 2,048 x 32 heads at length 8192, head dim 128: offsets up to ~2**37 elements."""
    stride_h = 8192 * 128
    stride_b = 32 * stride_h
    out = torch.zeros(1, dtype=torch.int64)
    _offset_probe[(1,)](out, b, h, stride_b, stride_h)
    assert out.item() == b * stride_b + h * stride_h  # Python ints: exact


def test_program_ids_cover_every_block_once():
    length, block, batch, heads = 40, 16, 2, 3  # 3 blocks, the last one partial
    (programs,) = launcher._grid(length, block, batch * heads)
    assert programs == 3 * batch * heads
    out = torch.full((programs, 4), -1, dtype=torch.int32)
    _program_ids_probe[(programs,)](out, length, heads, BLOCK=block)
    seen = {tuple(row) for row in out.tolist()}
    want = {(m, b * heads + h, b, h) for m in range(3) for b in range(batch) for h in range(heads)}
    assert seen == want and len(seen) == programs
    # the blocks of one (batch, head) are adjacent programs (they share its K / V in L2)
    assert out[:3, 1].tolist() == [0, 0, 0] and out[:3, 0].tolist() == [0, 1, 2]


class _Recorder:
    """Stands in for a jit kernel: records each launch's grid, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def _mask_args(mode: int, batch: int, q_len: int, device) -> launcher._MaskArgs:
    prefix = prefix_range = None
    if mode == PREFIX:
        prefix = torch.zeros(batch, dtype=torch.int32, device=device)
        prefix_range = torch.zeros(batch, 2, dtype=torch.int32, device=device)
    return launcher._MaskArgs(mode, None, None, None, None, prefix, prefix_range, None, None, 0,
                              0.1, None, None, None)


@pytest.mark.parametrize("mode", [CAUSAL, PREFIX])
def test_launcher_grid_for_batch_1024_by_64_heads(monkeypatch, mode):
    """Every kernel's grid fits CUDA's limits at batch 1024 x 64 heads (65,536 pairs, which
    grid axis 1 could not take): one axis, below 2**31."""
    recorders = {name: _Recorder() for name in ("_fwd_kernel", "_bwd_preprocess_kernel",
                                                "_bwd_dkdv_kernel", "_bwd_dq_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(launcher, name, recorder)
    batch, heads, length, head_dim = 1024, 64, 8192, 128
    meta = torch.device("meta")
    q, k, v = (torch.empty(batch, heads, length, head_dim, dtype=torch.float16, device=meta)
               for _ in range(3))
    mask = _mask_args(mode, batch, length, meta)
    out, lse = launcher._forward(q, k, v, None, mask)
    launcher._backward(q, k, v, out, lse, torch.empty_like(out), None, mask)
    fwd, (dkdv, dq) = default_block_configs(head_dim, torch.float16)
    want = {"_fwd_kernel": triton.cdiv(length, fwd.block_m),
            "_bwd_preprocess_kernel": triton.cdiv(length, launcher._preprocess_blocks(
                head_dim)[1]),
            "_bwd_dkdv_kernel": triton.cdiv(length, dkdv.block_n),
            "_bwd_dq_kernel": triton.cdiv(length, dq.block_m)}
    for name, recorder in recorders.items():
        assert recorder.grids == [(want[name] * batch * heads,)], name
        for grid in recorder.grids:
            assert len(grid) == 1 and grid[0] <= 2**31 - 1  # axes 1 and 2 unused (<= 65,535)


def test_grid_beyond_cuda_limit_is_refused():
    with pytest.raises(ValueError, match="grid limit"):
        launcher._grid(1 << 20, 16, 1 << 16)


_COMPILE = """
import re, sys
from tools.kernel_report import Variant, compile_variant, fa, missing_toolchain
if missing_toolchain(80):
    print("SKIP", missing_toolchain(80))
    sys.exit(0)
for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
    ttgir = compile_variant(Variant(kernel, fa.PREFIX, "fp16", 128), 80).asm["ttgir"]
    print(kernel, len(re.findall(r"arith\\.muli [^\\n]*: i64", ttgir)))
"""


def test_compiled_offsets_are_64_bit():
    """The sm_80 TTGIR of every kernel multiplies the (batch, head) offsets in i64 (before:
    none); the compile runs in a subprocess (this process imported Triton interpreted)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("SKIP"):
        pytest.skip(run.stdout)
    counts = dict(re.findall(r"^(\w+) (\d+)$", run.stdout, re.M))
    assert set(counts) == {"fwd", "bwd_dkdv", "bwd_dq"}, run.stdout
    # q, k, v (and dO, out) bases: b * stride_b and h * stride_h each
    assert all(int(n) >= 6 for n in counts.values()), counts
