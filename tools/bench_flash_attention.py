#!/usr/bin/env python3
"""Benchmark the fused attention kernel against SDPA and FlexAttention (a thin wrapper).

The benchmark lives in ``kernels/bench.py`` (also ``megarch-bench-attention`` and
``python -m kernels.bench``); its docstring describes the comparisons, columns and targets.

Usage: python tools/bench_flash_attention.py [--seq-lens 1024 4096] [--head-dims 64 128]
           [--modes causal prefix] [--passes fwd fwd_bwd] [--csv PATH] [--cpu-small]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
