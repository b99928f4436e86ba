"""Batched log-likelihoods equal an independent, unbatched computation, for every arch."""

from __future__ import annotations

import pytest
import torch

from megarch.config.train import TrainConfig
from megarch.eval.rank_classification import RankOptions, encode_pair, rank_classify
from megarch.eval.scoring import run_format, score_continuations, start_id, truncate_context
from megarch.eval.tasks import Example, Task
from tests.eval.helpers import ARCHS, reference_logprob, tiny

PROMPTS = ["The sky is", "Q: is two more than one?\nA:", "x", "A long prompt " * 4]
CHOICES = [" blue", " yes", " no", "?", " a much longer answer"]


def _score(model, tok, pairs, **kwargs):
    kwargs.setdefault("start_id", tok.bos_id)
    return score_continuations(model, pairs, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                               **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eos", [True, False])
def test_batched_scores_match_unbatched_reference(models, tok, arch, eos):
    model = models[arch]
    pairs = [encode_pair(tok, p, c, eos, eos) for p in PROMPTS for c in CHOICES]
    scores = _score(model, tok, pairs, batch_size=7)  # uneven batches, padding in each
    for (context, continuation), score in zip(pairs, scores, strict=True):
        expected = reference_logprob(model, context, continuation, tok.vocab_size, tok.bos_id)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.n_tokens == len(continuation)
        assert score.mean_logprob == pytest.approx(expected / len(continuation), abs=1e-4)


def test_encode_pair_eos_convention(tok):
    context, continuation = encode_pair(tok, "ab", "c")
    assert context == tok.encode("ab") + [tok.eos_id]
    assert continuation == tok.encode("c") + [tok.eos_id]
    assert encode_pair(tok, "ab", "c", False, False) == (tok.encode("ab"), tok.encode("c"))


def test_padded_vocabulary_rows_are_left_out(tok):
    model = tiny("causal_decoder")
    pairs = [encode_pair(tok, "hello", " world")]
    before = _score(model, tok, pairs)[0].logprob
    with torch.no_grad():
        model.embed.weight[tok.vocab_size:] *= 50.0  # rows no tokenizer id can reach
    assert _score(model, tok, pairs)[0].logprob == pytest.approx(before, abs=1e-5)


def test_greedy_flag_and_normalisation(models, tok):
    model = models["causal_decoder"]
    context = tok.encode("abc")
    scores = _score(model, tok, [(context, [t]) for t in range(tok.vocab_size)], batch_size=64)
    logprobs = torch.tensor([s.logprob for s in scores], dtype=torch.float64)
    assert float(logprobs.exp().sum()) == pytest.approx(1.0, abs=1e-5)  # a distribution
    assert [s.greedy for s in scores] == [t == int(logprobs.argmax()) for t in range(len(scores))]


def test_nd_prefix_is_bidirectional_and_differs_from_causal(models, tok):
    nd = models["nonc_decoder"]
    cd = tiny("causal_decoder")
    cd.load_state_dict(nd.state_dict())  # one network: only the mask differs
    context, continuation = encode_pair(tok, "abcdef", " gh")
    changed = list(context)
    changed[0] = tok.encode("z")[0]
    for model in (nd, cd):
        a, b = (_score(model, tok, [(c, continuation)])[0].logprob for c in (context, changed))
        assert abs(a - b) > 1e-4  # a prompt token changes the score
    nd_score = _score(nd, tok, [(context, continuation)])[0].logprob
    cd_score = _score(cd, tok, [(context, continuation)])[0].logprob
    assert abs(nd_score - cd_score) > 1e-4
    # Bidirectional: an early prompt position sees a later prompt token under ND, not under CD.
    late = list(context)
    late[4] = tok.encode("q")[0]
    for model, sees_later in ((nd, True), (cd, False)):
        outs = [model(tokens=torch.tensor([[tok.bos_id] + c]),
                      prefix_len=torch.tensor([len(c) + 1]))[0, 1] for c in (context, late)]
        assert (not torch.allclose(outs[0], outs[1], atol=1e-6)) == sees_later


def test_nd_continuation_does_not_leak_into_earlier_scores(models, tok):
    nd = models["nonc_decoder"]
    context, (a, b) = tok.encode("prompt"), tok.encode("xy")
    with torch.no_grad():
        logits = nd(tokens=torch.tensor([[tok.bos_id, *context, a, b]]),
                    prefix_len=torch.tensor([len(context) + 1]))[0, -1, : tok.vocab_size]
    logp = torch.log_softmax(logits.double(), -1)
    c, d = tok.encode("c")[0], tok.encode("d")[0]
    s_c, s_d = (_score(nd, tok, [(context, [a, b, t])])[0].logprob for t in (c, d))
    assert s_c - s_d == pytest.approx(float(logp[c] - logp[d]), abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_long_prompts_are_cut_from_the_left(models, tok, arch):
    model = models[arch]
    context, continuation = tok.encode("0123456789" * 3), tok.encode("ab")
    max_len = 12
    kept = truncate_context(context, continuation, max_len, arch == "encoder_decoder")
    assert kept == context[-len(kept):]
    assert len(kept) == (12 if arch == "encoder_decoder" else 10)
    got = _score(model, tok, [(context, continuation)], max_len=max_len)[0].logprob
    assert got == pytest.approx(
        reference_logprob(model, kept, continuation, tok.vocab_size, tok.bos_id), abs=1e-4)
    with pytest.raises(ValueError, match="no room"):
        truncate_context(context, continuation, 0 if arch == "encoder_decoder" else 1,
                         arch == "encoder_decoder")


def test_rank_classify_predicts_the_argmax(models, tok):
    task = Task("t", "t.jsonl", [
        Example(prompts=["I say", "You say"], choices=[[" yes", " no"], [" ja", " nein!"]],
                label=1),
        Example(prompts=["a", "b"], choices=[["x", "yy"], ["zzz", "w"]], label=0),
    ])
    model = models["encoder_decoder"]
    result = rank_classify(model, tok, task, RankOptions(batch_size=3))
    for k in range(2):
        for i, ex in enumerate(task.examples):
            refs = [reference_logprob(model, *encode_pair(tok, ex.prompts[k], c),
                                      tok.vocab_size, tok.bos_id) for c in ex.choices[k]]
            assert [s.logprob for s in result.scores[k][i]] == pytest.approx(refs, abs=1e-4)
            assert result.predictions()[k][i] == max(range(2), key=refs.__getitem__)
            lengths = [len(encode_pair(tok, ex.prompts[k], c)[1]) for c in ex.choices[k]]
            means = [r / n for r, n in zip(refs, lengths, strict=True)]
            assert result.predictions(normalize=True)[k][i] == max(range(2), key=means.__getitem__)
    accuracies = result.prompt_accuracies()
    assert accuracies == [sum(p == ex.label for p, ex in zip(preds, task.examples, strict=True))
                          / 2 for preds in result.predictions()]


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_start_for_stream_trained_decoders(models, tok, arch):
    model = models[arch]
    first = start_id(model, tok, "eos")
    assert first == (tok.bos_id if arch == "encoder_decoder" else tok.eos_id)
    pairs = [encode_pair(tok, p, c, False, True) for p in PROMPTS[:2] for c in CHOICES[:2]]
    for (context, continuation), score in zip(pairs, _score(model, tok, pairs, start_id=first),
                                              strict=True):
        assert score.logprob == pytest.approx(
            reference_logprob(model, context, continuation, tok.vocab_size, first), abs=1e-4)
    with pytest.raises(ValueError, match="decoder_start"):
        start_id(model, tok, "pad")


@pytest.mark.parametrize("objective,prompt_eos,start", [
    ("flm", False, "eos"), ("plm", False, "eos"), ("mlm", True, "bos"), ("multitask", True, "bos"),
])
def test_input_format_follows_the_training_samples(objective, prompt_eos, start):
    cfg = TrainConfig()
    cfg.data.objective = objective
    cfg.data.seq_len, cfg.data.inputs_len, cfg.data.targets_len = 100, 30, 7
    assert run_format(cfg) == {"prompt_eos": prompt_eos, "choice_eos": True,
                               "decoder_start": start}
    options = RankOptions.for_run(cfg, choice_eos=False, decoder_start=None)
    assert (options.prompt_eos, options.choice_eos, options.decoder_start) == (
        prompt_eos, False, start)
    assert options.max_len == (37 if objective == "multitask" else 100)
