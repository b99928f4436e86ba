"""Relative position buckets by hand, the bias table lookup, and rotary embeddings."""

import torch

from megarch.model.position import (
    RelativePositionBias,
    apply_rotary,
    relative_position_buckets,
    rotary_cos_sin,
)

# (key_pos - query_pos) -> bucket, worked out by hand from T5's rule with 32 buckets and max
# distance 128. Causal: max_exact 16; a distance n >= 16 goes to 16 + floor(16 log(n/16)/log 8).
CAUSAL = {0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -127: 31, -128: 31, -1000: 31,
          1: 0, 50: 0}
# Bidirectional: 16 buckets per side, max_exact 8; keys after the query add 16;
# n >= 8 goes to 8 + floor(8 log(n/8)/log 16): 16 -> 10, 32 -> 12, 64 -> 14 (exact powers),
# 100 -> 8 + floor(7.29) = 15.
BIDIRECTIONAL = {0: 0, -3: 3, 3: 19, -7: 7, 7: 23, -8: 8, -16: 10, 16: 26, -32: 12, -64: 14,
                 -100: 15, -128: 15, 200: 31, -12: 9}


def _check(table, bidirectional):
    rel = torch.tensor(list(table))
    got = relative_position_buckets(rel, bidirectional, n_buckets=32, max_distance=128)
    assert got.tolist() == list(table.values())


def test_causal_buckets_by_hand():
    _check(CAUSAL, bidirectional=False)


def test_bidirectional_buckets_by_hand():
    _check(BIDIRECTIONAL, bidirectional=True)


def test_bias_reads_the_table_per_head_and_packed_segments_match_unpacked():
    torch.manual_seed(0)
    module = RelativePositionBias(n_heads=3, bidirectional=True)
    torch.nn.init.normal_(module.table)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two segments, positions restart
    bias = module(packed, packed)  # [1, heads, 7, 7]
    assert bias.shape == (1, 3, 7, 7)
    # query at position 1, key at position 3 of the second segment: distance +2 -> bucket 18
    assert torch.equal(bias[0, :, 4, 6], module.table[18])
    assert torch.equal(bias[0, :, 6, 3], module.table[3])  # key 3 before the query
    alone = torch.arange(4)[None]
    assert torch.equal(bias[:, :, 3:, 3:], module(alone, alone))


def test_bias_table_gets_gradients():
    module = RelativePositionBias(n_heads=2, bidirectional=False, n_buckets=8, max_distance=16)
    torch.nn.init.zeros_(module.table)
    pos = torch.arange(5)[None]
    module(pos, pos).sum().backward()
    # 5x5 pairs: the 15 with key at/after query share bucket 0, distance n in 1..3 are exact
    assert module.table.grad[:, 0].tolist() == [15, 4, 3, 2, 1, 0, 0, 0]


def test_rotary_matches_complex_rotation_and_depends_on_distance_only():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 7, 30]])
    cos, sin = rotary_cos_sin(pos, 8, dtype=torch.float64)
    got = apply_rotary(x, cos, sin)
    inv = 10000.0 ** -(torch.arange(4, dtype=torch.float64) / 4)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * pos[0, :, None] * inv)
    assert torch.allclose(got, torch.cat((z.real, z.imag), dim=-1), atol=1e-6)
    q, k = torch.randn(2, 1, 1, 3, 8, dtype=torch.float64)

    def score(shift):
        p = torch.tensor([[3, 9, 4]]) + shift
        c, s = rotary_cos_sin(p, 8, dtype=torch.float64)
        return apply_rotary(q, c, s) @ apply_rotary(k, c, s).transpose(-1, -2)

    assert torch.allclose(score(0), score(11), atol=1e-4)
    assert not torch.allclose(score(0), q @ k.transpose(-1, -2), atol=1e-2)
