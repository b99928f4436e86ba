"""FlashAttention-2 style fused attention with the study's masks and T5 relative position bias.

One Triton kernel family covers every attention of the study, the mask being a compile-time
mode (same integers as ``megarch.model.attention.MaskMode``; this file does not import megarch,
so it can be taken alone):

- ``CAUSAL`` (0): key j is visible from query i iff same segment and ``j <= i``.
- ``PREFIX`` (1): same segment and (``j <= i`` or ``j < prefix_len[i]``); ``prefix_len`` is
  [batch] (one prefix per row) or [batch, q_len] (one value per query, for packed rows).
- ``BIDIRECTIONAL`` (2): same segment.
- ``CROSS`` (3): q_len may differ from k_len; query i sees key j iff their segments match.

Segment ids ([batch, len], 1, 2, ... per packed segment, 0 = padding): attention never crosses
segments and a padding key is visible to no query; a query that sees no key outputs exactly 0
(and gets zero gradients), never NaN. Omitted segment ids mean one segment without padding.

The optional T5 relative position bias is computed in the kernel from ``q_positions`` /
``k_positions`` ([batch, len], positions within each segment) and the learned table
``[num_buckets, heads]``: the launcher turns the table into a per-head bias by clamped distance
(``[heads, 2 R + 1]``, exact because T5 buckets saturate beyond ``max_distance``) and the
kernels gather from it; its gradient is accumulated with atomics and flows back to the table
through ordinary autograd indexing.

Attention dropout (``dropout_p`` > 0, a compile-time flag: 0 builds the kernels without it)
drops probabilities by a counter-based Philox draw per (batch, head, query, key) element from
``dropout_seed``, so the backward regenerates the forward's mask instead of storing it
(``dropout_mask`` returns it; the algebra is in ``_backward``'s docstring).

Grouped-query and multi-query attention: k / v may have ``kv_heads`` heads, a divisor of q's;
query head h reads KV head ``h // (heads // kv_heads)`` in place (no repeated copy), and the
dK/dV kernel runs once per KV head, summing over its group's query heads in registers.

Layout: q [batch, heads, q_len, head_dim], k/v [batch, kv_heads, k_len, head_dim] (any strides);
fp16 / bf16 / fp32 inputs (fp32 dots in 3xTF32), fp32 accumulation; any sequence length; head
dims up to 256 (32/64/128 tuned).

Tiles no query of a block can see are skipped: past the diagonal (causal; prefix beyond the
block's longest prefix) and outside the blocks' segments (packed rows). Without segment ids,
tiles every query of a block fully sees (in bounds, below the diagonal or inside every row's
prefix) run in a loop of their own without mask arithmetic, only the diagonal and edge tiles
apply the mask (``masks._free_key_end`` / ``_free_query_range``). The forward saves the
log-sum-exp; the backward recomputes the probabilities (FlashAttention-2), one kernel for
dK/dV over key blocks and one for dQ over query blocks, which also adds the bias gradient with
atomics (so that one gradient is not bitwise deterministic).

Tiles: on a GPU each kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) is autotuned per
(kernel, mode, segments, bias, dropout, head dim, dtype, sequence-length bucket) from
``candidate_block_configs``, timed once on the first call's tensors; under the interpreter the
fixed ``default_block_configs`` are used. ``MEGARCH_FLASH_CONFIG`` forces them ("default", or
e.g. "fwd=128x64x8x3,bwd=32x64x4x2"); explicit ``fwd_config`` / ``bwd_config`` win over both.

Files (each imports only torch and triton, so the folder can be copied alone): ``modes.py``
(mask constants), ``masks.py`` (tile visibility and skip ranges), ``bias.py`` (the T5 bias in
kernel form), ``dropout.py`` (the Philox keep mask), ``forward.py`` and ``backward.py`` (the jit
kernels), ``autotune.py`` (tile configs and the autotuner), ``launcher.py`` (kernel-form inputs
and launches), ``function.py`` (autograd Function and ``flash_attention``), ``reference.py``
(the plain-PyTorch reference ``flash_attention_ref``, the one every test and the benchmark use).
"""

from __future__ import annotations

from .autotune import (
    CONFIG_ENV,
    KERNELS,
    BlockConfig,
    candidate_block_configs,
    default_block_config,
    default_block_configs,
    forced_block_configs,
    selected_block_configs,
)
from .bias import bias_by_distance, bias_range
from .dropout import dropout_mask
from .function import FlashAttentionFunction, flash_attention
from .masks import _interpreting
from .modes import BIDIRECTIONAL, CAUSAL, CROSS, MODE_NAMES, PREFIX
from .reference import attention_mask_ref, flash_attention_ref, relative_position_bucket

__all__ = [
    "BIDIRECTIONAL", "CAUSAL", "CONFIG_ENV", "CROSS", "KERNELS", "MODE_NAMES", "PREFIX",
    "BlockConfig", "FlashAttentionFunction", "attention_mask_ref", "bias_by_distance",
    "bias_range", "candidate_block_configs", "default_block_config", "default_block_configs",
    "dropout_mask", "flash_attention", "flash_attention_ref", "forced_block_configs",
    "relative_position_bucket", "selected_block_configs", "_interpreting",
]
