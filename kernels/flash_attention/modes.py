"""Mask modes of the attention kernels and the constants their jit code reads.

The integers are ``megarch.model.attention.MaskMode``'s; this package imports nothing from
megarch, so the folder can be copied alone.
"""

from __future__ import annotations

import triton.language as tl

CAUSAL = 0
PREFIX = 1
BIDIRECTIONAL = 2
CROSS = 3
MODE_NAMES = {CAUSAL: "causal", PREFIX: "prefix", BIDIRECTIONAL: "bidirectional", CROSS: "cross"}

# Compile-time copies for the kernels (a jit function may only read constexpr globals).
_CAUSAL = tl.constexpr(CAUSAL)
_PREFIX = tl.constexpr(PREFIX)
_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels use exp2
