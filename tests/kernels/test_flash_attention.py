"""The fused attention kernel (through the Triton interpreter on CPU) against float64 references.

Every case draws fresh random inputs, fills the kernel's output buffers with NaN before it runs
(an unwritten element shows up), and compares ||out - ref|| / ||ref|| with the tolerance table
below. bf16 is mis-computed by the interpreter, so it is only checked on a GPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kernels.flash_attention as fa
from kernels.flash_attention import (
    BIDIRECTIONAL,
    CAUSAL,
    CROSS,
    PREFIX,
    BlockConfig,
    flash_attention,
    flash_attention_ref,
    launcher,
)

# Relative error ||x - ref|| / ||ref|| allowed per input dtype: the one tolerance table.
TOLERANCE = {
    torch.float32: {"out": 1e-5, "grad": 2e-5},  # interpreter ~1e-7; GPU 3xTF32 dots
    torch.float16: {"out": 1e-3, "grad": 2e-3},
    torch.bfloat16: {"out": 1e-2, "grad": 2e-2},
}

# Small tiles so lengths 17/40/70 cross several blocks and none is a multiple of the tile.
FWD_TILES = BlockConfig(block_m=16, block_n=32)
BWD_TILES = BlockConfig(block_m=32, block_n=16)
MODES = {"causal": CAUSAL, "prefix": PREFIX, "bidirectional": BIDIRECTIONAL, "cross": CROSS}
INTERPRETED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Kernel output buffers start as NaN, so any element a kernel fails to write is caught."""

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launcher, "_empty", empty)


def _segments(gen, batch, length, n_max=3, pad=True):
    """Packed rows: 1..n segments of random lengths, optionally trailing padding (id 0)."""
    seg = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        used = length - (int(torch.randint(0, length // 3, (1,), generator=gen)) if pad else 0)
        n = int(torch.randint(1, n_max + 1, (1,), generator=gen))
        cuts = sorted(torch.randint(1, max(used, 2), (n - 1,), generator=gen).tolist())
        for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used], strict=True), start=1):
            seg[b, lo:hi] = s
    return seg


def make_case(mode, dtype, q_len, k_len=None, *, head_dim=16, batch=2, heads=2,
              segments=True, bias=True, per_query_prefix=True, seed=0, device="cpu",
              kv_heads=None):
    """Random inputs (q, k, v, kwargs) for ``flash_attention``; q/k/v/table require grad.
    ``kv_heads``: k / v heads (grouped-query attention), default ``heads``."""
    gen = torch.Generator().manual_seed(seed)
    k_len = q_len if k_len is None else k_len

    def rand(*shape):
        x = torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)
        return x.requires_grad_()

    kv_heads = heads if kv_heads is None else kv_heads
    q, k, v = rand(batch, heads, q_len, head_dim), rand(batch, kv_heads, k_len, head_dim), \
        rand(batch, kv_heads, k_len, head_dim)
    kwargs = {}
    if segments:
        kwargs["q_segment_ids"] = _segments(gen, batch, q_len).to(device)
        if mode == CROSS:
            # Same segment numbering on the encoder side, with its own lengths and padding.
            k_seg = _segments(gen, batch, k_len).to(device)
            kwargs["k_segment_ids"] = k_seg
    if mode == PREFIX:
        shape = (batch, q_len) if per_query_prefix else (batch,)
        kwargs["prefix_len"] = torch.randint(0, q_len + 1, shape, generator=gen).to(device)
    if bias:
        kwargs["rel_bias_table"] = torch.randn(32, heads, generator=gen).to(device) \
            .requires_grad_()
        # Positions spread beyond max_distance in both directions to reach every bucket.
        kwargs["q_positions"] = torch.randint(0, 300, (batch, q_len), generator=gen).to(device)
        kwargs["k_positions"] = torch.randint(0, 300, (batch, k_len), generator=gen).to(device)
    return q, k, v, kwargs


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_against_float64(mode, dtype, q, k, v, kwargs, fwd=FWD_TILES, bwd=BWD_TILES,
                          dropout=None):
    """Forward and gradients of q, k, v (and the bias table) vs the float64 reference.

    ``dropout``: (p, seed): attention dropout, the reference applying the kernel's mask.
    """
    drop, ref_drop = {}, {}
    if dropout is not None:
        p, seed = dropout
        drop = {"dropout_p": p, "dropout_seed": seed}
        shape = (*q.shape[:3], k.shape[2])
        ref_drop = {"dropout_p": p,
                    "dropout_mask": fa.dropout_mask(seed, shape, p, device=q.device)}
    out = flash_attention(q, k, v, mode, fwd_config=fwd, bwd_config=bwd, **kwargs, **drop)
    assert out.dtype == dtype and not out.isnan().any()
    grad_out = torch.randn_like(out)
    leaves = [q, k, v] + ([kwargs["rel_bias_table"]] if "rel_bias_table" in kwargs else [])
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_kwargs = dict(kwargs)
    if "rel_bias_table" in kwargs:
        ref_kwargs["rel_bias_table"] = kwargs["rel_bias_table"].double()
    ref = flash_attention_ref(q.double(), k.double(), v.double(), mode, **ref_kwargs, **ref_drop)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())

    tol = TOLERANCE[dtype]
    assert rel_err(out, ref) < tol["out"], rel_err(out, ref)
    for name, g, rg in zip("q k v table".split(), grads, ref_grads, strict=False):
        assert not g.isnan().any(), f"NaN in d{name}"
        assert rel_err(g, rg) < tol["grad"], (name, rel_err(g, rg))
    return out, grads


@pytest.mark.parametrize("dtype_name", INTERPRETED_DTYPES)
@pytest.mark.parametrize("mode_name", MODES)
def test_every_mode_with_segments_and_bias(mode_name, dtype_name):
    mode, dtype = MODES[mode_name], INTERPRETED_DTYPES[dtype_name]
    k_len = 23 if mode == CROSS else None  # cross: Lq != Lk, neither a multiple of the tiles
    seed = 1000 * mode + len(dtype_name)
    q, k, v, kwargs = make_case(mode, dtype, 40, k_len, seed=seed)
    check_against_float64(mode, dtype, q, k, v, kwargs)


@pytest.mark.parametrize(
    "mode_name, q_len, k_len, head_dim, segments, bias",
    [
        ("causal", 17, None, 32, False, False),  # plain causal, one partial tile
        ("bidirectional", 17, None, 16, True, False),
        ("cross", 17, 40, 16, False, True),  # Lk > Lq
        ("prefix", 40, None, 32, False, True),
    ],
)
def test_mask_and_bias_subsets(mode_name, q_len, k_len, head_dim, segments, bias):
    mode = MODES[mode_name]
    q, k, v, kwargs = make_case(mode, torch.float32, q_len, k_len, head_dim=head_dim,
                                segments=segments, bias=bias, seed=7 + q_len + head_dim)
    check_against_float64(mode, torch.float32, q, k, v, kwargs)


def test_prefix_per_row_and_tile_skipping():
    """A [batch] prefix; tiles bigger than the prefix and 70 > 2 tiles exercise the skip bounds."""
    q, k, v, kwargs = make_case(PREFIX, torch.float32, 70, segments=False, bias=False,
                                per_query_prefix=False, seed=11)
    kwargs["prefix_len"] = torch.tensor([0, 45])  # row 0: pure causal; row 1: a long prefix
    check_against_float64(PREFIX, torch.float32, q, k, v, kwargs,
                          fwd=BlockConfig(16, 16), bwd=BlockConfig(16, 16))


@pytest.mark.parametrize("mode_name", ["causal", "cross"])
def test_padding_queries_output_exact_zeros(mode_name):
    """Queries that see no key (padding) give exactly 0 and zero gradients, never NaN."""
    mode = MODES[mode_name]
    k_len = 23 if mode == CROSS else 40
    q, k, v, kwargs = make_case(mode, torch.float32, 40, k_len, segments=False, seed=21)
    q_seg = torch.ones(2, 40, dtype=torch.long)
    q_seg[0, 30:] = 0
    q_seg[1, :] = 0  # a whole row of padding
    kwargs["q_segment_ids"] = q_seg
    out, (dq, dk, dv, _) = check_against_float64(mode, torch.float32, q, k, v, kwargs)
    assert (out[0, :, 30:] == 0).all() and (out[1] == 0).all()
    assert (dq[0, :, 30:] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()


def test_cross_key_padding_only():
    """k_segment_ids alone (encoder padding) hide padded keys from every query."""
    q, k, v, kwargs = make_case(CROSS, torch.float32, 17, 40, segments=False, bias=False, seed=3)
    k_seg = torch.ones(2, 40, dtype=torch.long)
    k_seg[0, 25:] = 0
    kwargs["k_segment_ids"] = k_seg
    check_against_float64(CROSS, torch.float32, q, k, v, kwargs)


def test_strided_inputs():
    """q, k, v as views of a [batch, len, heads, head_dim] projection (the model's layout)."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 40, 3, 2, 16, generator=gen, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [b, h, l, d], not contiguous
    assert not q.is_contiguous()
    _, _, _, kwargs = make_case(BIDIRECTIONAL, torch.float32, 40, seed=5)
    out = flash_attention(q, k, v, BIDIRECTIONAL, fwd_config=FWD_TILES, bwd_config=BWD_TILES,
                          **kwargs)
    grad_out = torch.randn(out.shape, generator=gen).transpose(2, 3).contiguous() \
        .transpose(2, 3)  # a non-contiguous output gradient too
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    ref_kwargs = {**kwargs, "rel_bias_table": kwargs["rel_bias_table"].double()}
    ref = flash_attention_ref(q.double(), k.double(), v.double(), BIDIRECTIONAL, **ref_kwargs)
    (ref_grad,) = torch.autograd.grad(ref, qkv, grad_out.double())
    assert rel_err(out, ref) < TOLERANCE[torch.float32]["out"]
    assert rel_err(grad, ref_grad) < TOLERANCE[torch.float32]["grad"]


def test_segment_spans_bound_every_visible_key():
    """The tile-skipping spans: exact for padding, a superset of same-segment keys otherwise."""
    seg_a = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [3, 1, 1, 99, -4, 2, 0]])
    seg_b = torch.tensor([[1, 2, 2, 1, 0], [0, 1, 3, 3, 2]])  # non-contiguous ids too
    span = launcher._segment_spans(seg_a, seg_b)
    for b, i in itertools.product(range(2), range(7)):
        same = [j for j in range(5) if seg_b[b, j] == seg_a[b, i] and seg_a[b, i] != 0]
        first, end = span[b, i].tolist()
        if seg_a[b, i] == 0:
            assert first >= end  # padding: no key at all
        assert all(first <= j < end for j in same), (b, i, same, first, end)
    assert span[1, 3].tolist() == [0, 5] and span[1, 4].tolist() == [0, 5]  # unknown ids


@pytest.mark.parametrize("mode_name", ["causal", "prefix", "cross"])
def test_packed_rows_skip_tiles(mode_name):
    """Many short segments and 16-wide tiles: most tiles are skipped; results still exact."""
    mode = MODES[mode_name]
    k_len = 45 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, torch.float16, 70, k_len, seed=60 + mode)
    gen = torch.Generator().manual_seed(61 + mode)
    kwargs["q_segment_ids"] = _segments(gen, 2, 70, n_max=6)
    if mode == CROSS:
        kwargs["k_segment_ids"] = _segments(gen, 2, 45, n_max=6)
    tiles = BlockConfig(16, 16)
    check_against_float64(mode, torch.float16, q, k, v, kwargs, fwd=tiles, bwd=tiles)


def test_relative_position_buckets_match_the_model():
    """The kernel file's T5 bucketing equals megarch.model.position's, for both kinds."""
    from megarch.model.position import relative_position_buckets

    relative = torch.arange(-1000, 1001)
    for bidirectional, (n_buckets, max_distance) in itertools.product(
            (True, False), ((32, 128), (16, 64), (8, 20))):
        ours = fa.relative_position_bucket(relative, bidirectional, n_buckets, max_distance)
        theirs = relative_position_buckets(relative, bidirectional, n_buckets, max_distance)
        assert torch.equal(ours, theirs), (bidirectional, n_buckets, max_distance)
        # The kernel clamps distances to [-R, R]: buckets must saturate beyond R.
        r = fa.bias_range(n_buckets, max_distance)
        clamped = fa.relative_position_bucket(relative.clamp(-r, r), bidirectional, n_buckets,
                                              max_distance)
        assert torch.equal(ours, clamped)


@pytest.mark.parametrize("mode_name", MODES)
def test_matches_the_model_attention(mode_name):
    """Kernel vs megarch.model.attention's reference path with the model's T5 bias module."""
    from megarch.model.attention import MaskMode, attention
    from megarch.model.position import RelativePositionBias

    mode = MODES[mode_name]
    assert MaskMode[mode_name.upper()] == mode
    k_len = 23 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, torch.float32, 40, k_len, seed=50 + mode)
    bidirectional = mode in (BIDIRECTIONAL, CROSS)
    position_bias = RelativePositionBias(2, bidirectional, n_buckets=32, max_distance=128)
    with torch.no_grad():
        position_bias.table.copy_(kwargs["rel_bias_table"])
    bias = position_bias(kwargs["q_positions"], kwargs["k_positions"])
    model_out = attention(q.detach(), k.detach(), v.detach(), MaskMode(mode),
                          q_segment_ids=kwargs.get("q_segment_ids"),
                          k_segment_ids=kwargs.get("k_segment_ids"),
                          prefix_len=kwargs.get("prefix_len"), bias=bias.detach())
    out = flash_attention(q, k, v, mode, bidirectional_buckets=bidirectional,
                          fwd_config=FWD_TILES, bwd_config=BWD_TILES, **kwargs)
    assert rel_err(out, model_out) < TOLERANCE[torch.float32]["out"]


def test_reference_matches_the_model_reference():
    """flash_attention_ref agrees with megarch's attention: the float64 checks test the contract."""
    from megarch.model.attention import MaskMode, attention

    for mode in MODES.values():
        k_len = 23 if mode == CROSS else None
        q, k, v, kwargs = make_case(mode, torch.float64, 40, k_len, bias=False, seed=80 + mode)
        ours = flash_attention_ref(q, k, v, mode, **kwargs)
        theirs = attention(q, k, v, MaskMode(mode), **kwargs)
        assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode_name, kv_heads", [("causal", 2), ("prefix", 1),
                                                  ("bidirectional", 2), ("cross", 1)])
def test_grouped_query_attention(mode_name, kv_heads):
    """4 query heads on 2 (GQA) or 1 (MQA) KV heads, with segments and the T5 bias: the kernel
    against float64 attention over KV heads repeated per group (built here, so the reference's
    own grouping is not what is tested); dK / dV are the sums over each group."""
    mode = MODES[mode_name]
    k_len = 23 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, torch.float32, 40, k_len, heads=4, kv_heads=kv_heads,
                                seed=90 + mode)
    out = flash_attention(q, k, v, mode, fwd_config=FWD_TILES, bwd_config=BWD_TILES, **kwargs)
    assert out.shape == q.shape
    grad_out = torch.randn_like(out)
    leaves = [q, k, v, kwargs["rel_bias_table"]]
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    group = 4 // kv_heads
    k_rep, v_rep = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    ref = flash_attention_ref(q.double(), k_rep, v_rep, mode,
                              **{**kwargs, "rel_bias_table": kwargs["rel_bias_table"].double()})
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    assert rel_err(out, ref) < TOLERANCE[torch.float32]["out"]
    for name, g, rg in zip("q k v table".split(), grads, ref_grads, strict=True):
        assert rel_err(g, rg) < TOLERANCE[torch.float32]["grad"], name
    # The reference's own grouping agrees (the model's CPU path goes through it).
    ours = flash_attention_ref(q.double(), k.double(), v.double(), mode, **{
        **kwargs, "rel_bias_table": kwargs["rel_bias_table"].double()})
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


def test_rejects_bad_inputs():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="q_len == k_len"):
        flash_attention(q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), CAUSAL)
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, q.half(), q.half(), CAUSAL)
    with pytest.raises(ValueError, match="prefix_len"):
        flash_attention(q, q, q, PREFIX)
    with pytest.raises(ValueError, match="rel_bias_table"):
        flash_attention(q, q, q, CAUSAL, rel_bias_table=torch.zeros(16, 2))
    with pytest.raises(ValueError, match="mode"):
        flash_attention(q, q, q, 7)
    with pytest.raises(ValueError, match="KV heads must divide the query heads"):
        kv = torch.randn(1, 3, 8, 16)
        flash_attention(torch.randn(1, 4, 8, 16), kv, kv, CAUSAL)


@pytest.mark.parametrize("mode_name, head_dim", [("prefix", 80), ("cross", 96)])
def test_head_dims_80_and_96(mode_name, head_dim):
    """Head dims between powers of two run in place at the d128 default tiles (a 128-wide
    register tile, the loads and stores masked to ``head_dim`` columns: no padded copy)."""
    mode = MODES[mode_name]
    fwd, bwd = fa.default_block_configs(head_dim, torch.float16)
    assert (fwd, bwd) == fa.default_block_configs(128, torch.float16)
    k_len = 50 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, torch.float16, fwd.block_m + 9, k_len, head_dim=head_dim,
                                seed=head_dim + mode)
    assert q.shape[-1] == head_dim
    check_against_float64(mode, torch.float16, q, k, v, kwargs, fwd=fwd, bwd=bwd)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", INTERPRETED_DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("mode_name", MODES)
def test_larger_shapes(mode_name, head_dim, dtype_name):
    """Head dims 32-128 with the default GPU tiles of the dtype, 2+ forward tiles long."""
    mode, dtype = MODES[mode_name], INTERPRETED_DTYPES[dtype_name]
    fwd, bwd = fa.default_block_configs(head_dim, dtype)
    q_len = 2 * fwd.block_m + 17
    k_len = q_len - 37 if mode == CROSS else None
    q, k, v, kwargs = make_case(mode, dtype, q_len, k_len, head_dim=head_dim,
                                seed=head_dim + mode)
    check_against_float64(mode, dtype, q, k, v, kwargs, fwd=fwd, bwd=bwd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fa._interpreting(),
                    reason="needs CUDA and TRITON_INTERPRET unset")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode_name", MODES)
def test_gpu(mode_name, dtype):
    """Compiled kernels on a GPU, default tiles, head dims 64 and 128, every dtype."""
    mode = MODES[mode_name]
    for head_dim, q_len in ((64, 300), (128, 257)):
        k_len = 190 if mode == CROSS else None
        q, k, v, kwargs = make_case(mode, dtype, q_len, k_len, head_dim=head_dim,
                                    seed=int(math.log2(head_dim)) + mode, device="cuda")
        fwd, bwd = fa.default_block_configs(head_dim, dtype)
        check_against_float64(mode, dtype, q, k, v, kwargs, fwd=fwd, bwd=bwd)
