"""Mask-free tiles: the kernels run fully visible, in-bounds tiles without mask arithmetic.

Two kinds of check, both through the Triton interpreter on CPU:

- the free ranges themselves (``masks._free_key_end`` for the forward and dQ loops over key
  tiles, ``masks._free_query_range`` for the dK/dV loop over query blocks), computed by the
  kernels' own jit helpers in small probe kernels, against the dense reference mask over many
  random shapes, tiles and prefix lengths: every free tile is fully visible and in bounds
  (soundness), and every such tile is free (tightness) wherever the helpers claim exactness;
- the kernels: forward and gradients (bias table included) against the float64 reference for
  every mode without segment ids (the case with free tiles), lengths on and off the tiles,
  with and without the T5 bias and dropout; and equality with the same kernels whose free
  ranges are emptied (every tile masked: the kernels before the split), bit for bit where the
  summation order is the same, which also counts that free tiles ran.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.flash_attention import (
    BIDIRECTIONAL,
    CAUSAL,
    CROSS,
    PREFIX,
    BlockConfig,
    attention_mask_ref,
    backward,
    flash_attention,
    forward,
    launcher,
)
from kernels.flash_attention.masks import (
    _free_key_end,
    _free_query_range,
    _key_range,
    _load_row_info,
    _query_range,
)
from tests.kernels.test_flash_attention import (  # noqa: F401 - _poisoned_outputs: autouse
    FWD_TILES,
    MODES,
    _poisoned_outputs,
    _segments,
    check_against_float64,
    make_case,
    rel_err,
)


@triton.jit
def _key_ranges_probe(OUT, QSEG, QSPAN, PREFIX, q_len, k_len, stride_pb, stride_pm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                      HAS_SEG: tl.constexpr):
    """(lo, free end, hi) of query block program_id(0) of batch row program_id(1), as the
    forward and dQ kernels compute them."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    _, prefix, _ = _load_row_info(QSEG, PREFIX, QSEG, b, offs_m, q_len, stride_pb, stride_pm,
                                  MODE, HAS_SEG, False)
    lo, hi = _key_range(QSPAN, b, pid_m, offs_m, q_len, k_len, prefix, BLOCK_M, BLOCK_N, MODE,
                        HAS_SEG)
    free = _free_key_end(pid_m, offs_m, q_len, k_len, prefix, lo, hi, BLOCK_M, BLOCK_N, MODE,
                         HAS_SEG)
    out = OUT + (b * tl.num_programs(0) + pid_m) * 3
    tl.store(out, lo)
    tl.store(out + 1, free)
    tl.store(out + 2, hi)


@triton.jit
def _query_ranges_probe(OUT, KSPAN, PREFIX_RANGE, q_len, k_len, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_SEG: tl.constexpr):
    """(lo, free start, free end, hi) of key block program_id(0) of batch row program_id(1),
    as the dK/dV kernel computes them."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lo, hi = _query_range(KSPAN, PREFIX_RANGE, b, pid_n, offs_n, q_len, k_len, BLOCK_M, BLOCK_N,
                          MODE, HAS_SEG)
    free_lo, free_hi = _free_query_range(PREFIX_RANGE, b, pid_n, q_len, k_len, lo, hi, BLOCK_M,
                                         BLOCK_N, MODE, HAS_SEG)
    out = OUT + (b * tl.num_programs(0) + pid_n) * 4
    tl.store(out, lo)
    tl.store(out + 1, free_lo)
    tl.store(out + 2, free_hi)
    tl.store(out + 3, hi)


def _random_prefix(gen, batch: int, q_len: int, kind: str) -> torch.Tensor:
    """[batch] ("row"), [batch, q_len] constant per row ("row_as_queries"), near-constant per
    query ("near": the block minimum matters), or uniform per query ("uniform")."""
    base = torch.randint(0, q_len + 4, (batch, 1), generator=gen)  # may pass q_len
    if kind == "row":
        return base[:, 0]
    if kind == "row_as_queries":
        return base.expand(batch, q_len).contiguous()
    if kind == "near":
        return (base + torch.randint(-3, 4, (batch, q_len), generator=gen)).clamp_min(0)
    return torch.randint(0, q_len + 1, (batch, q_len), generator=gen)


def _random_case(gen):
    mode = int(torch.randint(0, 4, (1,), generator=gen))
    block_m, block_n = (int(x) for x in 2 ** torch.randint(2, 6, (2,), generator=gen))
    on_tiles = bool(torch.rand((), generator=gen) < 0.3)  # lengths multiples of both tiles

    def length() -> int:
        if on_tiles:
            return max(block_m, block_n) * int(torch.randint(1, 4, (1,), generator=gen))
        return int(torch.randint(1, 90, (1,), generator=gen))

    q_len = length()
    k_len = length() if mode == CROSS else q_len
    kind = ("row", "row_as_queries", "near", "uniform")[int(torch.randint(0, 4, (1,),
                                                                          generator=gen))]
    prefix_len = _random_prefix(gen, 2, q_len, kind) if mode == PREFIX else None
    return mode, block_m, block_n, q_len, k_len, prefix_len, kind


def _dense_mask(mode, q_len, k_len, prefix_len, seg=None):
    mask = attention_mask_ref(mode, q_len, k_len, seg, None, prefix_len)
    return mask.expand(2, q_len, k_len)


def _fully_visible(mask, b, rows: tuple[int, int], keys: tuple[int, int], q_len, k_len) -> bool:
    """Every (query, key) of the tile in bounds and visible."""
    return rows[1] <= q_len and keys[1] <= k_len and bool(
        mask[b, rows[0]:rows[1], keys[0]:keys[1]].all())


def _key_ranges(mode, block_m, block_n, q_len, k_len, prefix_len, seg=None):
    batch = 2
    n_blocks = triton.cdiv(q_len, block_m)
    out = torch.full((batch, n_blocks, 3), -1, dtype=torch.int32)
    prefix, _ = launcher._prefix(mode, prefix_len, batch, q_len, "cpu")
    q_seg = span = None
    if seg is not None:
        q_seg = seg.int().contiguous()
        span = launcher._segment_spans(q_seg, q_seg)
    zero = torch.zeros(1, dtype=torch.int32)
    stride_pb, stride_pm = (0, 0) if prefix is None else (
        (prefix.stride(0), 0) if prefix.dim() == 1 else prefix.stride())
    _key_ranges_probe[(n_blocks, batch)](
        out, zero if q_seg is None else q_seg, zero if span is None else span,
        zero if prefix is None else prefix, q_len, k_len, stride_pb, stride_pm,
        BLOCK_M=block_m, BLOCK_N=block_n, MODE=mode, HAS_SEG=seg is not None)
    return out


def _query_ranges(mode, block_m, block_n, q_len, k_len, prefix_len, seg=None):
    batch = 2
    n_blocks = triton.cdiv(k_len, block_n)
    out = torch.full((batch, n_blocks, 4), -1, dtype=torch.int32)
    _, prefix_range = launcher._prefix(mode, prefix_len, batch, q_len, "cpu")
    zero = torch.zeros(1, dtype=torch.int32)
    span = None if seg is None else launcher._segment_spans(seg.int(), seg.int())
    _query_ranges_probe[(n_blocks, batch)](
        out, zero if span is None else span, zero if prefix_range is None else prefix_range,
        q_len, k_len, BLOCK_M=block_m, BLOCK_N=block_n, MODE=mode, HAS_SEG=seg is not None)
    return out


def test_free_key_tiles_are_sound_and_tight():
    """Forward / dQ: per query block, the free key tiles [lo, free) are exactly the fully
    visible in-bounds ones (per-query prefixes included: the block's shortest visible run)."""
    gen = torch.Generator().manual_seed(0)
    free_seen = 0
    for trial in range(150):
        mode, block_m, block_n, q_len, k_len, prefix_len, kind = _random_case(gen)
        what = (trial, mode, block_m, block_n, q_len, k_len, kind)
        mask = _dense_mask(mode, q_len, k_len, prefix_len)
        ranges = _key_ranges(mode, block_m, block_n, q_len, k_len, prefix_len)
        for b in range(2):
            for pid_m, (lo, free, hi) in enumerate(ranges[b].tolist()):
                rows = (pid_m * block_m, (pid_m + 1) * block_m)
                assert lo % block_n == 0 and lo <= free <= hi, (what, lo, free, hi)
                assert (free - lo) % block_n == 0, (what, lo, free)
                free_tiles = set(range(lo // block_n, free // block_n))
                fully = {t for t in range(triton.cdiv(k_len, block_n)) if _fully_visible(
                    mask, b, rows, (t * block_n, (t + 1) * block_n), q_len, k_len)}
                assert free_tiles <= fully, (what, b, pid_m, free_tiles - fully)  # sound
                assert free_tiles == fully, (what, b, pid_m, fully - free_tiles)  # tight
                # and the masked loop [free, hi) with the free one covers every visible key
                seen = mask[b, rows[0]:min(rows[1], q_len)].any(dim=0).nonzero()
                assert seen.numel() == 0 or (lo <= seen.min() and seen.max() < hi), what
                free_seen += len(free_tiles)
    assert free_seen > 500  # the trials reach free tiles


def test_free_query_blocks_are_sound_and_tight():
    """dK/dV: per key block, the free query blocks [free_lo, free_hi) are fully visible and in
    bounds; exactly those for causal / bidirectional / cross and one prefix per row, a subset
    (by the row's shortest prefix) for per-query prefixes."""
    gen = torch.Generator().manual_seed(1)
    free_seen = 0
    for trial in range(150):
        mode, block_m, block_n, q_len, k_len, prefix_len, kind = _random_case(gen)
        what = (trial, mode, block_m, block_n, q_len, k_len, kind)
        mask = _dense_mask(mode, q_len, k_len, prefix_len)
        ranges = _query_ranges(mode, block_m, block_n, q_len, k_len, prefix_len)
        exact = mode != PREFIX or kind in ("row", "row_as_queries")
        for b in range(2):
            for pid_n, (lo, free_lo, free_hi, hi) in enumerate(ranges[b].tolist()):
                keys = (pid_n * block_n, (pid_n + 1) * block_n)
                assert lo % block_m == 0 and lo <= free_lo <= free_hi <= hi, (what, b, pid_n)
                assert (free_lo - lo) % block_m == 0 and (free_hi - free_lo) % block_m == 0
                free_blocks = set(range(free_lo // block_m, free_hi // block_m))
                fully = {r for r in range(triton.cdiv(q_len, block_m)) if _fully_visible(
                    mask, b, (r * block_m, (r + 1) * block_m), keys, q_len, k_len)}
                assert free_blocks <= fully, (what, b, pid_n, free_blocks - fully)  # sound
                if exact:
                    assert free_blocks == fully, (what, b, pid_n, fully - free_blocks)
                seen = mask[b, :, keys[0]:min(keys[1], k_len)].any(dim=1).nonzero()
                assert seen.numel() == 0 or (lo <= seen.min() and seen.max() < hi), what
                # masked above the free run: at most the partial last block
                assert hi - free_hi < block_m or free_lo == free_hi, (what, b, pid_n)
                free_seen += len(free_blocks)
    assert free_seen > 500


@pytest.mark.parametrize("mode_name", ["causal", "prefix", "bidirectional"])
def test_no_free_tiles_with_segment_ids(mode_name):
    """Segment ids: one segment per tile is not known without per-tile arithmetic, so no tile
    is free (the kernels compile the free loops out; the helpers say so too)."""
    mode = MODES[mode_name]
    gen = torch.Generator().manual_seed(2)
    seg = _segments(gen, 2, 50, n_max=1, pad=False)  # one segment: every tile visible
    prefix_len = torch.full((2,), 50) if mode == PREFIX else None
    for lo, free, _ in _key_ranges(mode, 16, 16, 50, 50, prefix_len, seg).reshape(-1, 3).tolist():
        assert free == lo
    for _, free_lo, free_hi, _ in _query_ranges(mode, 16, 16, 50, 50, prefix_len,
                                                seg).reshape(-1, 4).tolist():
        assert free_lo == free_hi


def _near_prefix(gen, batch: int, q_len: int) -> torch.Tensor:
    """Per-query prefixes close to a per-row length: the dK/dV blocks below the diagonal are
    free only while the row's shortest prefix covers them."""
    base = torch.tensor([q_len // 2, q_len - 5])[:batch, None]
    return (base + torch.randint(-3, 4, (batch, q_len), generator=gen)).clamp(0, q_len)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lengths", ["on_tiles", "off_tiles"])
@pytest.mark.parametrize("mode_name", MODES)
def test_matches_float64_without_segments(mode_name, lengths, bias):
    """No segment ids (free tiles run): forward, dq, dk, dv and the bias table's gradient."""
    mode = MODES[mode_name]
    q_len, k_len = {"on_tiles": (64, 96 if mode == CROSS else None),
                    "off_tiles": (70, 41 if mode == CROSS else None)}[lengths]
    q, k, v, kwargs = make_case(mode, torch.float32, q_len, k_len, segments=False, bias=bias,
                                seed=500 + 10 * mode + len(lengths) + bias)
    if mode == PREFIX:
        kwargs["prefix_len"] = _near_prefix(torch.Generator().manual_seed(mode), 2, q_len)
    check_against_float64(mode, torch.float32, q, k, v, kwargs)


@pytest.mark.parametrize("mode_name", MODES)
def test_matches_float64_with_dropout(mode_name):
    """Free tiles draw the same dropout mask as masked ones (the reference applies it)."""
    mode = MODES[mode_name]
    q, k, v, kwargs = make_case(mode, torch.float32, 70, 41 if mode == CROSS else None,
                                segments=False, seed=600 + mode)
    if mode == PREFIX:
        kwargs["prefix_len"] = _near_prefix(torch.Generator().manual_seed(mode), 2, 70)
    check_against_float64(mode, torch.float32, q, k, v, kwargs, dropout=(0.2, 4321 + mode))


def test_matches_float64_fp16_default_tiles():
    """fp16 at head dim 64 with the default tiles: causal, off the tiles (dropout + bias)."""
    q, k, v, kwargs = make_case(CAUSAL, torch.float16, 200, head_dim=64, segments=False,
                                batch=1, heads=1, seed=700)
    check_against_float64(CAUSAL, torch.float16, q, k, v, kwargs, fwd=None, bwd=None,
                          dropout=(0.1, 5))


class _TileSpy:
    """Wraps a tile helper of the kernels, counting free and masked calls."""

    def __init__(self, tile):
        self.tile = tile
        self.calls = {True: 0, False: 0}

    def __call__(self, *args, MASKED):
        self.calls[bool(MASKED)] += 1
        return self.tile(*args, MASKED=MASKED)


def _run(mode, q, k, v, kwargs):
    out = flash_attention(q, k, v, mode, fwd_config=FWD_TILES, bwd_config=BlockConfig(16, 16),
                          **kwargs)
    leaves = [q, k, v] + ([kwargs["rel_bias_table"]] if "rel_bias_table" in kwargs else [])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def _spy_tiles(monkeypatch) -> dict[str, _TileSpy]:
    spies = {"fwd": _TileSpy(forward._fwd_tile), "dkdv": _TileSpy(backward._dkdv_tile),
             "dq": _TileSpy(backward._dq_tile)}
    monkeypatch.setattr(forward, "_fwd_tile", spies["fwd"])
    monkeypatch.setattr(backward, "_dkdv_tile", spies["dkdv"])
    monkeypatch.setattr(backward, "_dq_tile", spies["dq"])
    return spies


def _mask_every_tile(monkeypatch) -> None:
    """Empty free ranges: every tile through the masked body (the kernels before the split;
    the interpreter looks the helpers up in the kernels' module globals at each call)."""
    monkeypatch.setattr(forward, "_free_key_end", lambda *args: args[5])  # lo_n
    monkeypatch.setattr(backward, "_free_key_end", lambda *args: args[5])
    monkeypatch.setattr(backward, "_free_query_range", lambda *args: (args[6], args[6]))  # hi_m


def _compare_with_masked(split, masked, bitwise: set[str]) -> None:
    for name, x, y in zip(["out", "dq", "dk", "dv", "dtable"], split, masked, strict=True):
        if name in bitwise:
            assert torch.equal(x, y), (name, (x - y).abs().max().item())
        else:  # another summation order: fp32 rounding
            assert rel_err(x, y) < 1e-6, (name, rel_err(x, y))


@pytest.mark.parametrize("q_len", [64, 70])
@pytest.mark.parametrize("mode_name", MODES)
def test_free_tiles_match_masked_tiles(mode_name, q_len, monkeypatch):
    """The free tile body computes what the masked one does (bias and dropout on): the forward
    keeps its key order, so the same bits; dK/dV too when q_len is a multiple of BLOCK_M (16
    here: no partial block after the free run); dQ and the bias gradient sum the masked tiles
    first, so only fp32 rounding."""
    mode = MODES[mode_name]
    q, k, v, kwargs = make_case(mode, torch.float32, q_len, 41 if mode == CROSS else None,
                                segments=False, seed=800 + mode + q_len)
    kwargs.update(dropout_p=0.1, dropout_seed=3)
    if mode == PREFIX:
        kwargs["prefix_len"] = _near_prefix(torch.Generator().manual_seed(mode), 2, q_len)
    spies = _spy_tiles(monkeypatch)
    split = _run(mode, q, k, v, kwargs)
    for name, spy in spies.items():
        assert spy.calls[False] > 0, (name, spy.calls)  # (bidirectional 64: all free)
        spy.calls = {True: 0, False: 0}
    _mask_every_tile(monkeypatch)
    masked = _run(mode, q, k, v, kwargs)
    for name, spy in spies.items():
        assert spy.calls[False] == 0, (name, spy.calls)
    _compare_with_masked(split, masked, {"out", "dk", "dv"} if q_len % 16 == 0 else {"out"})


def test_grouped_query_free_tiles_match_masked_tiles(monkeypatch):
    """Grouped-query attention: each dK/dV loop walks the whole group, so dk / dv sum in
    another order than with every tile masked (fp32 rounding only); the forward's bits stay."""
    q, k, v, kwargs = make_case(CAUSAL, torch.float32, 64, segments=False, heads=4, kv_heads=2,
                                seed=900)
    split = _run(CAUSAL, q, k, v, kwargs)
    _mask_every_tile(monkeypatch)
    _compare_with_masked(split, _run(CAUSAL, q, k, v, kwargs), {"out"})


@pytest.mark.parametrize("mode", [CAUSAL, BIDIRECTIONAL])
def test_block_multiple_lengths_have_no_partial_tiles(mode):
    """Sanity of the probes on a plain case: causal 64 with 16 x 16 tiles leaves only the
    diagonal masked; bidirectional leaves nothing masked."""
    ranges = _key_ranges(mode, 16, 16, 64, 64, None)[0].tolist()
    for pid_m, (lo, free, hi) in enumerate(ranges):
        assert lo == 0 and hi == (16 * (pid_m + 1) if mode == CAUSAL else 64)
        assert free == (16 * pid_m if mode == CAUSAL else 64)
