"""attention() against an independent float64 loop over the mask rules of megarch.data.samples."""

import math

import pytest
import torch

from megarch.model.attention import MaskMode, attention, build_mask


def _visible(mode, i, j, q_seg, k_seg, prefix):
    """The data pipeline's rule for one (query i, key j) pair, written out plainly."""
    if k_seg[j] == 0 or q_seg[i] != k_seg[j]:
        return False
    if mode == MaskMode.CAUSAL:
        return j <= i
    if mode == MaskMode.PREFIX:
        return j <= i or j < prefix[i]
    return True  # BIDIRECTIONAL, CROSS


def naive_attention(q, k, v, mode, q_seg, k_seg, prefix, bias, scale):
    """Loops over batch, head, query, key with math.exp in float64."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for b in range(batch):
        pre = [0] * q_len if prefix is None else (
            [int(prefix[b])] * q_len if prefix.dim() == 1 else [int(p) for p in prefix[b]])
        for h in range(heads):
            for i in range(q_len):
                keys = [j for j in range(k_len)
                        if _visible(mode, i, j, q_seg[b].tolist(), k_seg[b].tolist(), pre)]
                if not keys:
                    continue
                logits = {}
                for j in keys:
                    s = sum(float(q[b, h, i, c]) * float(k[b, h, j, c]) for c in range(dim))
                    logits[j] = s * scale + (float(bias[h, i, j]) if bias is not None else 0.0)
                top = max(logits.values())
                weights = {j: math.exp(x - top) for j, x in logits.items()}
                total = sum(weights.values())
                for j, w in weights.items():
                    out[b, h, i] += (w / total) * v[b, h, j].double()
    return out


def _inputs(q_len=7, k_len=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, q_len, 4, generator=g, dtype=dtype)
    k = torch.randn(2, 3, k_len, 4, generator=g, dtype=dtype)
    v = torch.randn(2, 3, k_len, 4, generator=g, dtype=dtype)
    bias = torch.randn(3, q_len, k_len, generator=g, dtype=dtype)
    return q, k, v, bias


SEG = torch.tensor([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
CASES = [
    (MaskMode.CAUSAL, None),
    (MaskMode.BIDIRECTIONAL, None),
    (MaskMode.PREFIX, torch.tensor([2, 4])),  # one prefix per row
    (MaskMode.PREFIX, torch.tensor([[2, 2, 2, 5, 5, 5, 0], [0, 0, 3, 3, 3, 3, 3]])),  # per query
]


@pytest.mark.parametrize("mode,prefix", CASES, ids=["causal", "bidir", "prefix_row", "prefix_pos"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_self_attention_matches_loops(mode, prefix, with_bias):
    q, k, v, bias = _inputs()
    bias = bias if with_bias else None
    got = attention(q, k, v, mode, q_segment_ids=SEG, prefix_len=prefix, bias=bias, scale=0.7)
    want = naive_attention(q, k, v, mode, SEG, SEG, prefix, bias, 0.7)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_cross_attention_matches_loops():
    q, k, v, bias = _inputs(q_len=5, k_len=7)
    q_seg = torch.tensor([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    got = attention(q, k, v, MaskMode.CROSS, q_segment_ids=q_seg, k_segment_ids=SEG, bias=bias)
    want = naive_attention(q, k, v, MaskMode.CROSS, q_seg, SEG, None, bias, 4**-0.5)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_float32_and_bfloat16_inputs_close_to_float64_loops():
    q, k, v, bias = _inputs()
    want = naive_attention(q, k, v, MaskMode.CAUSAL, SEG, SEG, None, bias, 0.5)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = attention(q.to(dtype), k.to(dtype), v.to(dtype), MaskMode.CAUSAL,
                        q_segment_ids=SEG, bias=bias.to(dtype), scale=0.5)
        assert got.dtype == dtype
        assert (got.double() - want).norm() / want.norm() < tol


def test_no_segments_means_one_unpadded_segment():
    q, k, v, _ = _inputs()
    ones = torch.ones(2, 7, dtype=torch.long)
    for mode in (MaskMode.CAUSAL, MaskMode.BIDIRECTIONAL):
        assert torch.equal(attention(q, k, v, mode), attention(q, k, v, mode, q_segment_ids=ones))


def test_padded_rows_are_zero_without_nan_forward_and_backward():
    q, k, v, bias = _inputs(dtype=torch.float32)
    seg = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])  # row 1 all padding
    q, k, v, bias = (t.requires_grad_() for t in (q, k, v, bias))
    for mode, prefix in CASES:
        out = attention(q, k, v, mode, q_segment_ids=seg, prefix_len=prefix, bias=bias)
        assert not out.isnan().any()
        assert torch.equal(out[0, :, 3:], torch.zeros_like(out[0, :, 3:]))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        out.square().sum().backward()
        for t in (q, k, v, bias):
            assert not t.grad.isnan().any()
        assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))  # padded queries: no grad
        assert torch.equal(k.grad[0, :, 3:], torch.zeros_like(k.grad[0, :, 3:]))
        for t in (q, k, v, bias):
            t.grad = None


def test_build_mask_rules_by_hand():
    seg = torch.tensor([[1, 1, 1, 2, 2]])
    prefix = torch.tensor([[2, 2, 2, 5, 5]])
    got = build_mask(MaskMode.PREFIX, 5, 5, seg, prefix_len=prefix)[0].int()
    want = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1],
    ])
    assert torch.equal(got, want)
    causal = build_mask(MaskMode.CAUSAL, 5, 5, seg, prefix_len=prefix)[0].int()  # ignores prefix
    assert torch.equal(causal, torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]))


def test_bad_arguments_are_refused():
    q, k, v, _ = _inputs(q_len=3, k_len=5)
    with pytest.raises(ValueError, match="q_len == k_len"):
        attention(q, k, v, MaskMode.CAUSAL)
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="prefix_len"):
        attention(q, k, v, MaskMode.PREFIX)
