"""T5 span corruption against the study's numbers and independent statistics."""

import numpy as np
import pytest

from megarch.data import span_corruption as sc


def test_study_lengths():
    # PAPER.md: a 568-token chunk -> 512 inputs + 114 targets (both with EOS), 626 in all.
    assert sc.noise_counts(568) == (85, 28)
    assert sc.corrupted_lengths(568) == (512, 114)
    assert sc.raw_length_for(626) == 568
    assert sc.raw_length_for(inputs_length=512) == 568
    # The bound is tight: one more raw token no longer fits.
    assert sum(sc.corrupted_lengths(569)) > 626


@pytest.mark.parametrize("length", [2, 7, 20, 100, 568, 1001])
def test_noise_counts_follow_the_formula(length):
    n_noise = min(max(round(length * 0.15), 1), length - 1)
    assert sc.noise_counts(length) == (n_noise, max(1, round(n_noise / 3)))


def test_mask_shape_and_runs():
    rng = np.random.default_rng(0)
    for length in (10, 57, 568):
        n_noise, n_spans = sc.noise_counts(length)
        for _ in range(20):
            mask = sc.random_spans_noise_mask(rng, length)
            assert mask.sum() == n_noise and not mask[0]
            starts = np.flatnonzero(mask & ~np.concatenate(([False], mask[:-1])))
            assert len(starts) == n_spans  # every noise run is one span, none empty or merged


def test_statistics_over_many_rows():
    rng = np.random.default_rng(1)
    masks = np.stack([sc.random_spans_noise_mask(rng, 568) for _ in range(3000)])
    assert abs(masks.mean() - 0.15) < 0.002
    padded = np.pad(masks, ((0, 0), (1, 1)))
    edges = np.diff(padded.astype(np.int8), axis=1)
    span_lengths = np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)
    assert abs(span_lengths.mean() - 85 / 28) < 1e-9  # fixed counts: mean is exactly 85/28
    # Away from the edges each position is noise with probability close to 0.15; T5's layout
    # starts with a clean run and ends with a noise run.
    per_position = masks[:, 30:-30].mean(axis=0)
    assert per_position.min() > 0.12 and per_position.max() < 0.18
    assert not masks[:, 0].any() and masks[:, -1].all()
    # Span lengths vary (a random segmentation, not fixed-width spans).
    assert span_lengths.max() >= 10 and (span_lengths == 1).mean() > 0.2


def test_corrupt_reconstructs_and_numbers_sentinels():
    rng = np.random.default_rng(2)
    vocab = 32100
    for _ in range(50):
        tokens = rng.integers(3, 32000, 568)
        out = sc.corrupt(tokens, rng, vocab, eos_id=1)
        assert len(out.inputs) == 512 and len(out.targets) == 114
        assert out.inputs[-1] == 1 and out.targets[-1] == 1
        sentinels_in = out.inputs[out.inputs >= vocab - 100]
        sentinels_out = out.targets[out.targets >= vocab - 100]
        expected = vocab - 1 - np.arange(28)  # <extra_id_0> = 32099, counting down
        assert np.array_equal(sentinels_in, expected)
        assert np.array_equal(sentinels_out, expected)
        assert out.targets[0] == vocab - 1  # targets start with the first sentinel
        assert sc.reconstruct(out.inputs, out.targets, vocab, 1) == tokens.tolist()
        # Independent reconstruction from the mask itself.
        assert np.array_equal(out.targets[out.targets < vocab - 100][:-1], tokens[out.noise_mask])


def test_too_many_spans_is_refused():
    with pytest.raises(ValueError, match="sentinels"):
        sc.corrupt(np.arange(3000) + 3, np.random.default_rng(0), 32100, 1)
