"""Attention dropout inside the fused kernel (Triton interpreter on CPU).

The kernels regenerate their keep mask from (seed, element) in the forward and in both backward
kernels; ``dropout_mask`` draws the same mask with a separate kernel, and the float64 reference
applies it explicitly. Forward and gradients agreeing with that reference (with forward,
backward and mask kernels on three different tile shapes) shows the mask is the same in all of
them. Fresh random inputs and NaN-poisoned outputs, as in test_flash_attention.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.flash_attention as fa
from kernels.flash_attention import CROSS, PREFIX, BlockConfig, dropout_mask, flash_attention
from tests.kernels.test_flash_attention import (  # noqa: F401 - _poisoned_outputs: autouse
    INTERPRETED_DTYPES,
    MODES,
    TOLERANCE,
    _poisoned_outputs,
    _segments,
    check_against_float64,
    make_case,
    rel_err,
)


@pytest.mark.parametrize("mode_name", MODES)
def test_every_mode_with_dropout(mode_name):
    """Segments, T5 bias (its table's gradient too), lengths off the tiles, Lq != Lk for cross."""
    mode = MODES[mode_name]
    k_len = 23 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, torch.float32, 40, k_len, seed=300 + mode)
    check_against_float64(mode, torch.float32, q, k, v, kwargs,
                          dropout=(0.1 + 0.05 * mode, 1234 + mode))


def test_grouped_query_attention_with_dropout():
    """4 query heads on 2 KV heads: the dK/dV kernel regenerates each query head's mask."""
    q, k, v, kwargs = make_case(PREFIX, torch.float32, 40, heads=4, kv_heads=2, seed=320)
    check_against_float64(PREFIX, torch.float32, q, k, v, kwargs, dropout=(0.2, 77))


def test_fp16_packed_rows_with_dropout():
    """fp16, many short packed segments (most tiles skipped), p = 0.3."""
    q, k, v, kwargs = make_case(PREFIX, torch.float16, 45, seed=310)
    kwargs["q_segment_ids"] = _segments(torch.Generator().manual_seed(311), 2, 45, n_max=5)
    tiles = BlockConfig(16, 16)
    check_against_float64(PREFIX, torch.float16, q, k, v, kwargs, fwd=tiles, bwd=tiles,
                          dropout=(0.3, 99))


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.1, 0.3])
@pytest.mark.parametrize("dtype_name", INTERPRETED_DTYPES)
@pytest.mark.parametrize("mode_name", MODES)
def test_dropout_matrix(mode_name, dtype_name, p):
    """Every mode x dtype x p: packed rows 70 long (cross: 45 keys), per-query prefixes."""
    mode, dtype = MODES[mode_name], INTERPRETED_DTYPES[dtype_name]
    k_len = 45 if mode == CROSS else None
    seed = 400 + 10 * mode + len(dtype_name) + int(10 * p)
    q, k, v, kwargs = make_case(mode, dtype, 70, k_len, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    kwargs["q_segment_ids"] = _segments(gen, 2, 70, n_max=4)
    if mode == CROSS:
        kwargs["k_segment_ids"] = _segments(gen, 2, 45, n_max=4)
    check_against_float64(mode, dtype, q, k, v, kwargs, dropout=(p, seed))


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", MODES)
def test_dropout_default_tiles_head_dim_64(mode_name):
    """The GPU's default fp16 tiles (128-query forward blocks) at head dim 64."""
    mode = MODES[mode_name]
    fwd, bwd = fa.default_block_configs(64, torch.float16)
    k_len = 100 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, torch.float16, 150, k_len, head_dim=64, seed=500 + mode)
    check_against_float64(mode, torch.float16, q, k, v, kwargs, fwd=fwd, bwd=bwd,
                          dropout=(0.2, 500 + mode))


@pytest.mark.slow
def test_padding_queries_stay_zero_with_dropout():
    q, k, v, kwargs = make_case(CROSS, torch.float32, 40, 23, segments=False, seed=21)
    q_seg = torch.ones(2, 40, dtype=torch.long)
    q_seg[0, 30:] = 0
    kwargs["q_segment_ids"] = q_seg
    out, (dq, _, _, _) = check_against_float64(CROSS, torch.float32, q, k, v, kwargs,
                                               dropout=(0.25, 8))
    assert (out[0, :, 30:] == 0).all() and (dq[0, :, 30:] == 0).all()


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_mask_keeps_one_minus_p(p):
    """Kept fraction within 5 standard deviations of 1 - p overall and in each (batch, head)."""
    mask = dropout_mask(17, (2, 4, 128, 160), p)
    assert mask.dtype == torch.bool and mask.shape == (2, 4, 128, 160)
    n = mask.numel()
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    per_head = mask.float().mean(dim=(2, 3))
    n_head = 128 * 160
    assert ((per_head - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / n_head)).all(), per_head


def test_mask_depends_on_seed_and_element_only():
    """Same seed: same mask; other seed, other head or neighbouring key: independent draws
    (agreement (1-p)^2 + p^2, not 1); seeds equal modulo 2**62 share masks (documented)."""
    p, shape = 0.3, (1, 2, 96, 96)
    a = dropout_mask(5, shape, p)
    assert torch.equal(a, dropout_mask(5, shape, p))
    assert torch.equal(a, dropout_mask(5 + (1 << 62), shape, p))
    independent = (1 - p) ** 2 + p ** 2  # 0.58
    for x, y in ((a, dropout_mask(6, shape, p)), (a[:, 0], a[:, 1]),
                 (a[..., :-1], a[..., 1:]), (a[:, :, :-1], a[:, :, 1:])):
        agree = (x == y).float().mean().item()
        assert abs(agree - independent) < 5 * math.sqrt(0.25 / x.numel()), agree
    # A different shape keeps each element's draw (the counter is (query * k_len + key, head)).
    wide = dropout_mask(5, (1, 2, 96, 96), p)
    assert torch.equal(wide[:, :, :50], dropout_mask(5, (1, 2, 50, 96), p))


def test_seed_defaults_to_the_global_generator():
    """No seed: one draw from torch's CPU generator picks the masks; same torch seed, same
    output; zero dropout is exactly the kernel without dropout."""
    q, k, v, kwargs = make_case(PREFIX, torch.float32, 40, seed=320, bias=False)
    q, k, v = q.detach(), k.detach(), v.detach()

    def run(p, **extra):
        return flash_attention(q, k, v, PREFIX, dropout_p=p, **kwargs, **extra)

    torch.manual_seed(3)
    first = run(0.2)
    torch.manual_seed(3)
    assert torch.equal(run(0.2), first)
    torch.manual_seed(3)
    seed = int(torch.randint(1 << 62, ()).item())
    assert torch.equal(run(0.2, dropout_seed=seed), first)
    torch.manual_seed(4)
    assert not torch.allclose(run(0.2), first)
    plain = flash_attention(q, k, v, PREFIX, **kwargs)
    assert torch.equal(run(0.0, dropout_seed=seed), plain)
    assert rel_err(first, plain) > 0.05  # dropout really changes the output


def test_rejects_bad_dropout():
    q = torch.randn(1, 2, 8, 16)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p"):
            flash_attention(q, q, q, fa.CAUSAL, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_mask"):
        fa.flash_attention_ref(q, q, q, fa.CAUSAL, dropout_p=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fa._interpreting(),
                    reason="needs CUDA and TRITON_INTERPRET unset")
@pytest.mark.parametrize("mode_name, dtype, head_dim", [
    ("causal", torch.bfloat16, 64), ("prefix", torch.bfloat16, 128),
    ("bidirectional", torch.bfloat16, 64), ("cross", torch.bfloat16, 128),
    ("prefix", torch.float16, 64),
])  # few cases: each compiles three kernels, and tools/gpu_check.sh gives the GPU tests 100 s
def test_gpu_dropout(mode_name, dtype, head_dim):
    """Compiled kernels with dropout on a GPU, the default tiles."""
    mode = MODES[mode_name]
    k_len = 190 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, dtype, 300, k_len, head_dim=head_dim, seed=head_dim + mode,
                                device="cuda")
    fwd, bwd = fa.default_block_configs(head_dim, dtype)
    check_against_float64(mode, dtype, q, k, v, kwargs, fwd=fwd, bwd=bwd,
                          dropout=(0.1, head_dim + mode))
