"""Pieces of the attention backward, through the interpreter, against float64: the
``delta = rowsum(dO o O)`` preprocess kernel, and the T5 bias gradient's in-tile reduction
(per diagonal where a tile's positions are consecutive, per element where a segment boundary
crosses it)."""

from __future__ import annotations

import pytest
import torch

from kernels.flash_attention import BIDIRECTIONAL, CAUSAL, CROSS, PREFIX, BlockConfig, launcher
from tests.kernels.test_flash_attention import (  # noqa: F401 - _poisoned_outputs: autouse
    _poisoned_outputs,
    _segments,
    check_against_float64,
    make_case,
)


@pytest.mark.parametrize("dtype, head_dim, q_len", [(torch.float16, 80, 37),
                                                    (torch.float32, 16, 130)])
def test_delta_preprocess_matches_float64(dtype, head_dim, q_len):
    """A head dim that is no power of two (80: masked columns), lengths crossing partial
    blocks, and a non-contiguous dO (the model's layout)."""
    gen = torch.Generator().manual_seed(head_dim + q_len)
    out = torch.randn(2, 3, q_len, head_dim, generator=gen).to(dtype)
    do = torch.randn(2, q_len, 3, head_dim, generator=gen).to(dtype).transpose(1, 2)
    assert not do.is_contiguous()
    delta = launcher._delta(out, do)
    want = (out.double() * do.double()).sum(-1)
    assert delta.dtype == torch.float32 and delta.shape == want.shape
    assert not delta.isnan().any()  # every row written (the buffer starts as NaN)
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=1e-5)


# A small bias range (R = max(num_buckets, max_distance) = 12) so that 40-long rows reach both
# saturated ends (|k_pos - q_pos| >= R) and the exact middle inside one tile.
SMALL_T5 = {"num_buckets": 8, "max_distance": 12}


def _with_table(kwargs: dict, heads: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(SMALL_T5["num_buckets"], heads, generator=gen).requires_grad_()
    return {**kwargs, **SMALL_T5, "rel_bias_table": table}


@pytest.mark.parametrize("tiles", [BlockConfig(16, 16), BlockConfig(32, 16), BlockConfig(16, 32)])
@pytest.mark.parametrize("mode", [CAUSAL, BIDIRECTIONAL])
def test_bias_gradient_per_diagonal(mode, tiles):
    """Default positions 0..len-1: every tile takes the per-diagonal path (square and both
    oblong tiles: the skew's width is 2 x the longer side)."""
    q, k, v, kwargs = make_case(mode, torch.float32, 40, segments=False, bias=False,
                                seed=30 + mode + tiles.block_m)
    kwargs = _with_table(kwargs, 2, seed=mode)
    check_against_float64(mode, torch.float32, q, k, v, kwargs, fwd=tiles, bwd=tiles)


def _positions_in_segments(seg: torch.Tensor) -> torch.Tensor:
    """0, 1, ... restarting where the segment id changes (the model's packed positions)."""
    index = torch.arange(seg.shape[1]).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return index - torch.where(start, index, 0).cummax(1).values


@pytest.mark.parametrize("mode", [PREFIX, CROSS])
def test_bias_gradient_packed_positions(mode):
    """Packed rows whose positions restart per segment, offset positions on the key side:
    tiles inside a segment sum per diagonal (with a shift), the ones a boundary crosses per
    element."""
    k_len = 33 if mode == CROSS else 40
    q, k, v, kwargs = make_case(mode, torch.float32, 40, k_len, bias=False, seed=40 + mode)
    gen = torch.Generator().manual_seed(41 + mode)
    kwargs["q_segment_ids"] = _segments(gen, 2, 40, n_max=2)
    k_seg = kwargs["k_segment_ids"] if mode == CROSS else kwargs["q_segment_ids"]
    kwargs["q_positions"] = _positions_in_segments(kwargs["q_segment_ids"])
    kwargs["k_positions"] = _positions_in_segments(k_seg) + 5
    kwargs = _with_table(kwargs, 2, seed=7 + mode)
    tiles = BlockConfig(16, 16)
    check_against_float64(mode, torch.float32, q, k, v, kwargs, fwd=tiles, bwd=tiles)
