"""Attention dropout: a counter-based Philox keep mask per (batch, head, query, key) element.

The forward and both backward kernels regenerate the mask from the seed instead of storing it;
``dropout_mask`` draws the same mask into a tensor (for the reference and tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .masks import _interpreting

_SEED_FLAG = 1 << 62


def _kernel_seed(seed: int) -> int:
    """The kernels' form of a dropout seed: its low 62 bits with bit 62 set, so Triton always
    passes it as one int64 (never int32, never specialised to a constant); seeds equal
    modulo 2**62 draw the same masks."""
    return (int(seed) & (_SEED_FLAG - 1)) | _SEED_FLAG



@triton.jit
def _dropout_keep(seed, pid_bh, offs_m, start_n, k_len, dropout_p, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] attention-dropout keep mask of keys ``start_n`` (even) + [0, BLOCK_N)
    for queries ``offs_m`` of (batch * heads + head) ``pid_bh``.

    Counter-based (Philox-4x32, 10 rounds, key = the 64-bit seed): the key pair (j, j + 1),
    j even, of query i takes words 0 and 1 of Philox(counter = (i * k_len + j, pid_bh, 0, 0))
    as uniforms u in [0, 1); an element is kept iff u >= dropout_p. One call per pair halves
    the Philox work, and the pairs are the adjacent columns one thread holds in the MMA
    layouts of sm_80 / sm_90, so the join costs no layout conversion (all four words would).
    The bits depend on the element only, never on the tile, so every kernel and tile config
    (and ``dropout_mask``) regenerates the same mask without storing it. Needs
    q_len * k_len < 2**31 (the launcher checks).
    """
    offs_pair = start_n + 2 * tl.arange(0, BLOCK_N // 2)
    offset = offs_m[:, None] * k_len + offs_pair[None, :]  # [BLOCK_M, BLOCK_N // 2] int32
    zero = tl.zeros_like(offset)
    even, odd, _, _ = tl.philox(seed, offset, zero + pid_bh, zero, zero)
    bits = tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_N))  # key j + t: word t
    return tl.uint_to_uniform_float(bits) >= dropout_p



@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, q_len, k_len, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the keep mask (int8 [batch * heads, q_len, k_len])."""
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, offs_m, tl.program_id(2) * BLOCK_N, k_len, dropout_p,
                         BLOCK_M, BLOCK_N)
    ptrs = OUT + pid_bh.to(tl.int64) * q_len * k_len + offs_m[:, None] * k_len + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))



def _dropout_args(dropout_p: float, seed: int | None, q_len: int, k_len: int
                  ) -> tuple[float, int]:
    """(p, kernel-form seed) of ``flash_attention``'s dropout arguments, checked."""
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return 0.0, _SEED_FLAG
    if q_len * k_len >= 1 << 31:
        raise ValueError(f"attention dropout needs q_len * k_len < 2**31 (the mask's Philox "
                         f"counter), got {q_len} x {k_len}")
    if seed is None:
        seed = int(torch.randint(1 << 62, ()).item())  # global CPU generator: no device sync
    return dropout_p, _kernel_seed(seed)


def dropout_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The keep mask ``flash_attention(..., dropout_p=dropout_p, dropout_seed=seed)`` applies:
    bool [batch, heads, q_len, k_len] for ``shape`` = (batch, heads, q_len, k_len), True =
    kept (it scales kept probabilities by 1 / (1 - dropout_p)). Drawn by a Triton kernel
    sharing the attention kernels' RNG, so on CUDA (or CPU under ``TRITON_INTERPRET=1``).
    """
    batch, heads, q_len, k_len = shape
    p, kernel_seed = _dropout_args(dropout_p, seed, q_len, k_len)
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    out = torch.empty((batch * heads, q_len, k_len), dtype=torch.int8, device=device)
    if out.device.type != "cuda" and not _interpreting():
        raise ValueError(f"dropout_mask needs a CUDA device (got {out.device}), or "
                         "TRITON_INTERPRET=1 set before importing")
    block = 64
    grid = (batch * heads, triton.cdiv(q_len, block), triton.cdiv(k_len, block))
    _dropout_mask_kernel[grid](out, q_len, k_len, p, kernel_seed, BLOCK_M=block, BLOCK_N=block)
    return out.view(shape).bool()

