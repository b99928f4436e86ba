"""Every sample builder against an independent re-derivation from the raw documents."""

import numpy as np
import pytest
import torch

from megarch.config.data import DataConfig
from megarch.data import span_corruption
from megarch.data.datasets import build_dataset
from tests.data.helpers import BOS, EOS, PAD, TOKENIZER, VOCAB, random_docs, write_docs

L = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    docs = random_docs(400, seed=0)
    prefix = write_docs(str(root / "c_text_document"), docs)
    return {"root": root, "docs": docs, "prefix": prefix}


def make(corpus, objective, layout="decoder", num_samples=200, **kw):
    cfg = DataConfig(paths=[corpus["prefix"]], objective=objective, layout=layout, seq_len=L,
                     cache_dir=str(corpus["root"] / "cache"), split="1", **kw)
    return build_dataset(cfg, TOKENIZER, "train", num_samples)


def stream_of(ds, docs):
    """The token stream the rows are cut from, rebuilt from the cached document order."""
    order = np.asarray(ds.rows.doc_order)
    return np.concatenate([docs[d] for d in order])


def numpy_sample(ds, i):
    return {k: v.numpy() for k, v in ds[i].items()}


def test_flm_rows_are_the_shuffled_stream(corpus):
    ds = make(corpus, "flm")
    stream = stream_of(ds, corpus["docs"])
    order = np.asarray(ds.rows.doc_order)
    assert sorted(order[: len(corpus["docs"])].tolist()) == list(range(len(corpus["docs"])))
    seen_rows = []
    for i in range(len(ds)):
        s = numpy_sample(ds, i)
        row = int(ds.rows.sample_first_row[i])
        seen_rows.append(row)
        expected = stream[row * L : row * L + L + 1]  # rows of L+1, one token of overlap
        assert np.array_equal(s["tokens"], expected[:-1])
        assert np.array_equal(s["labels"], expected[1:])
        assert s["loss_mask"].sum() == L and s["prefix_len"] == 0
        assert (s["segment_ids"] == 1).all()
    assert sorted(seen_rows) == list(range(len(ds)))  # a permutation: every row once


def test_flm_document_segments(corpus):
    ds = make(corpus, "flm", segment_docs=True)
    stream = stream_of(ds, corpus["docs"])
    eos_positions = np.flatnonzero(stream == EOS)  # every document ends with its only EOS
    for i in range(30):
        s = numpy_sample(ds, i)
        start = int(ds.rows.sample_first_row[i]) * L
        new_doc = np.zeros(L, dtype=bool)
        ends = eos_positions[(eos_positions >= start) & (eos_positions < start + L - 1)]
        new_doc[ends - start + 1] = True
        assert np.array_equal(np.diff(s["segment_ids"]) == 1, new_doc[1:])
        assert ((s["positions"] == 0) == (new_doc | (np.arange(L) == 0))).all()


def test_plm_decoder_split_and_loss(corpus):
    ds = make(corpus, "plm", num_samples=3000)
    splits = []
    for i in range(len(ds)):
        s = numpy_sample(ds, i)
        split = int(s["prefix_len"])
        splits.append(split)
        assert 1 <= split <= L - 1
        loss = s["loss_mask"].astype(bool)
        assert np.array_equal(np.flatnonzero(loss), np.arange(split - 1, L))
        assert np.array_equal(s["labels"][:-1], s["tokens"][1:])
    counts = np.bincount(splits, minlength=L)[1:L]
    assert counts.min() > 0  # every split point in [1, L-1] occurs
    expected = len(splits) / (L - 1)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 2 * (L - 2)  # uniform: chi-square near its L-2 degrees of freedom
    assert abs(np.mean(splits) - L / 2) < 1.5


def test_plm_encoder_decoder_paired_rows(corpus):
    ds = make(corpus, "plm", layout="encoder_decoder")
    stream = np.concatenate([corpus["docs"][d] for d in np.asarray(ds.rows.doc_order)])
    for i in range(40):
        s = numpy_sample(ds, i)
        first = int(ds.rows.sample_first_row[i])
        ex0, ex1 = stream[first * L : (first + 1) * L], stream[(first + 1) * L : (first + 2) * L]
        split = int((s["encoder_segment_ids"] == 1).sum())
        assert 1 <= split <= L - 1
        assert np.array_equal(s["encoder_tokens"], np.concatenate((ex0[:split], ex1[: L - split])))
        labels = np.concatenate((ex0[split:], ex1[L - split :]))
        assert np.array_equal(s["decoder_labels"], labels)
        assert (s["decoder_segment_ids"] == 1).sum() == L - split
        dec_seg2 = L - split
        assert s["decoder_tokens"][0] == BOS and s["decoder_tokens"][dec_seg2] == BOS
        assert np.array_equal(s["decoder_tokens"][1:dec_seg2], labels[: dec_seg2 - 1])
        assert np.array_equal(s["decoder_tokens"][dec_seg2 + 1 :], labels[dec_seg2:-1])
        assert np.array_equal(s["encoder_positions"][split:], np.arange(L - split))
        assert np.array_equal(s["decoder_positions"][dec_seg2:], np.arange(split))
        assert s["decoder_loss_mask"].sum() == L


@pytest.mark.parametrize("layout", ["encoder_decoder", "decoder"])
def test_mlm_reconstructs_raw_chunks(corpus, layout):
    ds = make(corpus, "mlm", layout=layout)
    raw_len = span_corruption.raw_length_for(L)
    n_in, n_tgt = span_corruption.corrupted_lengths(raw_len)
    assert n_in + n_tgt <= L
    stream = stream_of(ds, corpus["docs"])
    for i in range(40):
        s = numpy_sample(ds, i)
        row = int(ds.rows.sample_first_row[i])
        raw = stream[row * raw_len : (row + 1) * raw_len]
        if layout == "encoder_decoder":
            inputs, targets = s["encoder_tokens"], s["decoder_labels"]
            assert np.array_equal(s["decoder_tokens"], np.concatenate(([BOS], targets[:-1])))
        else:
            used = n_in + n_tgt
            assert int(s["prefix_len"]) == n_in + 1
            shifted = np.concatenate(([BOS], s["labels"][: used - 1]))
            assert np.array_equal(s["tokens"][:used], shifted)
            assert np.array_equal(np.flatnonzero(s["loss_mask"]), np.arange(n_in, used))
            assert (s["segment_ids"][used:] == 0).all() and (s["tokens"][used:] == PAD).all()
            inputs, targets = s["labels"][:n_in], s["labels"][n_in:used]
        assert len(inputs) == n_in and len(targets) == n_tgt
        assert span_corruption.reconstruct(inputs, targets, VOCAB, EOS) == raw.tolist()


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompted")
    inputs = random_docs(300, seed=1, low=3, high=60)
    targets = random_docs(300, seed=2, low=1, high=20)
    write_docs(str(root / "m_inputs_document"), inputs)
    write_docs(str(root / "m_targets_document"), targets)
    return {"root": root, "inputs": inputs, "targets": targets, "prefix": str(root / "m")}


def make_multitask(prompted, layout, num_samples=None):
    cfg = DataConfig(paths=[prompted["prefix"]], objective="multitask", layout=layout,
                     inputs_len=40, targets_len=12, split="1",
                     cache_dir=str(prompted["root"] / "cache"))
    return build_dataset(cfg, TOKENIZER, "train", num_samples)


def _cut(tokens, limit):
    return tokens if len(tokens) <= limit else np.append(tokens[: limit - 1], tokens[-1])


@pytest.mark.parametrize("layout", ["decoder", "encoder_decoder"])
def test_multitask_packing(prompted, layout):
    ds = make_multitask(prompted, layout)
    seen, truncated = [], 0
    for i in range(len(ds)):
        s = numpy_sample(ds, i)
        ids = ds.order[ds.row_starts[i] : ds.row_starts[i + 1]]
        seen.extend(ids.tolist())
        prefix = "decoder_" if layout == "encoder_decoder" else ""
        seg = s[prefix + "segment_ids"]
        assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, len(ids) + 1))
        for k, d in enumerate(ids, start=1):
            x = _cut(prompted["inputs"][d], 40)
            y = _cut(prompted["targets"][d], 12)
            truncated += len(prompted["inputs"][d]) > 40 or len(prompted["targets"][d]) > 12
            where = np.flatnonzero(seg == k)
            assert np.array_equal(s[prefix + "positions"][where], np.arange(len(where)))
            if layout == "decoder":
                both = np.concatenate((x, y))
                assert np.array_equal(s["labels"][where], both)
                assert np.array_equal(s["tokens"][where], np.concatenate(([BOS], both[:-1])))
                assert np.array_equal(s["loss_mask"][where], np.arange(len(both)) >= len(x))
                assert (s["prefix_len"][where] == where[0] + len(x) + 1).all()
            else:
                enc_where = np.flatnonzero(s["encoder_segment_ids"] == k)
                assert np.array_equal(s["encoder_tokens"][enc_where], x)
                assert np.array_equal(s["decoder_labels"][where], y)
                assert s["decoder_loss_mask"][where].all()
        assert (s[prefix + "loss_mask"][seg == 0] == 0).all()
    assert sorted(seen) == list(range(300))  # one epoch: every example exactly once
    assert ds.truncated == truncated


def test_multitask_rows_are_full(prompted):
    ds = make_multitask(prompted, "decoder")
    for i in range(len(ds) - 1):
        used = int((numpy_sample(ds, i)["segment_ids"] > 0).sum())
        next_first = ds.order[ds.row_starts[i + 1]]
        next_len = min(len(prompted["inputs"][next_first]), 40) + min(
            len(prompted["targets"][next_first]), 12)
        assert used + next_len > 52  # greedy: the next example did not fit


def test_determinism_and_prefix_stability(corpus, tmp_path):
    small = make(corpus, "mlm", num_samples=50)
    large = make(corpus, "mlm", num_samples=900)
    assert len(large) > len(small)
    for i in range(len(small)):
        a, b = small[i], large[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = DataConfig(paths=[corpus["prefix"]], objective="mlm", seq_len=L, split="1",
                     cache_dir=str(tmp_path / "fresh"))
    fresh = build_dataset(cfg, TOKENIZER, "train", 50)  # rebuilt from scratch, elsewhere
    for i in range(len(small)):
        assert all(torch.equal(small[i][k], fresh[i][k]) for k in small[i])


def test_index_is_cached_once(corpus, tmp_path):
    cfg = DataConfig(paths=[corpus["prefix"]], objective="flm", seq_len=L, split="1",
                     cache_dir=str(tmp_path / "c"))
    build_dataset(cfg, TOKENIZER, "train", 100)
    entries = sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 1
    stamp = (tmp_path / "c" / entries[0] / "doc_order.npy").stat().st_mtime_ns
    build_dataset(cfg, TOKENIZER, "train", 100)
    assert (tmp_path / "c" / entries[0] / "doc_order.npy").stat().st_mtime_ns == stamp


def test_splits_are_disjoint(corpus, tmp_path):
    def docs_of(split):
        cfg = DataConfig(paths=[corpus["prefix"]], seq_len=L, split="80,15,5",
                         cache_dir=str(tmp_path))
        ds = build_dataset(cfg, TOKENIZER, split, None)
        return set(np.asarray(ds.rows.doc_order).tolist())

    train, valid, test = docs_of("train"), docs_of("valid"), docs_of("test")
    assert train == set(range(320)) and valid == set(range(320, 380))
    assert test == set(range(380, 400))


def test_blend_proportions(corpus, tmp_path):
    other = write_docs(str(tmp_path / "o_text_document"), random_docs(200, seed=5))
    cfg = DataConfig(paths=[corpus["prefix"], other], weights=[3.0, 1.0], seq_len=L, split="1",
                     cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(cfg, TOKENIZER, "train", 400)
    which = np.asarray(ds.which)
    for n in (4, 40, 400):
        assert abs((which[:n] == 1).sum() - n / 4) <= 1
    # Sample content comes from the named component, index for index.
    for i in (0, 5, 77):
        part = ds.datasets[which[i]][int(ds.index[i])]
        assert all(torch.equal(part[k], ds[i][k]) for k in part)


def _build_in_process(args):
    prefix, cache = args
    cfg = DataConfig(paths=[prefix], objective="mlm", seq_len=L, split="1", cache_dir=cache)
    ds = build_dataset(cfg, TOKENIZER, "train", 300)
    return [ds[i]["tokens"].tolist() for i in (0, 7, 299)]


def test_concurrent_ranks_share_one_index(corpus, tmp_path):
    import multiprocessing

    cache = str(tmp_path / "shared")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build_in_process, [(corpus["prefix"], cache)] * 3)
    assert results[0] == results[1] == results[2]
    built = [p for p in (tmp_path / "shared").iterdir() if p.is_dir()]
    assert len(built) == 1 and not [p for p in built if ".tmp-" in p.name]
    assert results[0] == _build_in_process((corpus["prefix"], str(tmp_path / "alone")))
