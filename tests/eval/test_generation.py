"""Generation: greedy equals step-by-step argmax, EOS stops a row, padded ids never appear, and
incremental decoding (the key/value cache) gives what rerunning the whole sequence gives.

The models here have untied output projections: a tiny random model with tied embeddings
mostly repeats its last input token (EOS, after a prompt), which would test little.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from megarch.eval.generation import GenerationOptions, generate, generate_text, next_token
from megarch.model import KVCache
from tests.eval.helpers import ARCHS, reference_greedy, tiny

PROMPTS = ["Once upon a time", "hi", "The answer is: 42, or"]


def untied(arch: str, seed: int = 0) -> torch.nn.Module:
    return tiny(arch, seed=seed, tie_embeddings=False)


@pytest.fixture(scope="module")
def models():
    return {arch: untied(arch) for arch in ARCHS}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_stepwise_argmax(models, tok, arch, use_cache):
    model = models[arch]
    ids = [tok.encode(p) for p in PROMPTS]
    got = generate(model, tok, ids, GenerationOptions(max_new_tokens=6, use_cache=use_cache))
    assert len({t for o in got for t in o}) > 5  # real outputs, not one repeated token
    for prompt, out in zip(ids, got, strict=True):
        assert out == reference_greedy(model, prompt + [tok.eos_id], tok.vocab_size, tok.bos_id,
                                       tok.eos_id, 6)


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_stops_a_row_and_padded_ids_never_appear(tok, arch):
    model = untied(arch, seed=1)
    with torch.no_grad():
        # Make the padding rows (ids >= tokenizer vocab) win the unmasked argmax.
        model.lm_head.weight[tok.vocab_size:] *= 40.0
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        raw = model(tokens=torch.tensor([[tok.bos_id] + prompts[1]]))[0, -1] if arch != \
            "encoder_decoder" else model(encoder_tokens=torch.tensor([prompts[1]]),
                                         decoder_tokens=torch.tensor([[tok.bos_id]]))[0, -1]
    assert int(raw.argmax()) >= tok.vocab_size  # the mask is what keeps them out
    outs = generate(model, tok, prompts, GenerationOptions(max_new_tokens=5))
    for out in outs:
        assert 1 <= len(out) <= 5 and max(out) < tok.vocab_size
        assert tok.eos_id not in out[:-1]
    sampled = generate(model, tok, prompts, GenerationOptions(max_new_tokens=5, temperature=2.0),
                       generator=torch.Generator().manual_seed(0))
    assert all(max(o) < tok.vocab_size for o in sampled)


def test_rows_stop_independently_at_eos(tok):
    model = untied("causal_decoder")
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] *= 0.0  # EOS (logit 0) never argmax on its own
    prompts = [tok.encode(p) for p in PROMPTS]
    free = generate(model, tok, prompts, GenerationOptions(max_new_tokens=4))
    assert all(len(o) == 4 and tok.eos_id not in o for o in free)
    # Force EOS right after the first row's first token: that row stops after 2 tokens, the
    # others go on (and stop wherever that token shows up in them).
    first = free[0][0]

    class StopAfterFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens, **kw):
            logits = self.inner(tokens, **kw)
            hit = tokens == first
            logits[..., tok.eos_id] = torch.where(hit, 1e4, logits[..., tok.eos_id])
            return logits

    outs = generate(StopAfterFirst(), tok, prompts, GenerationOptions(max_new_tokens=4))
    assert outs[0] == [first, tok.eos_id]
    for prompt, out in zip(prompts[1:], outs[1:], strict=True):
        expected = reference_greedy(StopAfterFirst(), prompt + [tok.eos_id], tok.vocab_size,
                                    tok.bos_id, tok.eos_id, 4)
        assert out == expected


def test_sampling_respects_top_k_and_seed():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 9.0]])
    seen = {int(next_token(logits, 4, temperature=5.0, top_k=2,
                           generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert seen == {1, 2}  # id 4 is past the vocabulary; top-2 of the rest
    a = [int(next_token(logits, 4, 1.0, generator=torch.Generator().manual_seed(3)))
         for _ in range(3)]
    assert len(set(a)) == 1
    assert int(next_token(logits, 4)) == 1


def test_generate_text_and_prompt_truncation(models, tok):
    model = models["nonc_decoder"]
    texts = generate_text(model, tok, ["abc"], GenerationOptions(max_new_tokens=3))
    assert isinstance(texts[0], str)
    long = tok.encode("z" * 50 + "tail")
    opts = GenerationOptions(max_new_tokens=3, max_len=16)
    kept = (long + [tok.eos_id])[-(16 - 1 - 3):]
    assert generate(model, tok, [long], opts) == [
        reference_greedy(model, kept, tok.vocab_size, tok.bos_id, tok.eos_id, 3)]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_eos_after_the_first_token_stops_every_row(tok, arch, use_cache):
    model = untied(arch)
    prompts = [tok.encode(p) for p in PROMPTS]
    opts = GenerationOptions(max_new_tokens=4, use_cache=use_cache)
    free = generate(model, tok, prompts, opts)
    boost = torch.zeros(tok.vocab_size + 1000)
    boost[tok.eos_id] = 1e4
    if arch == "encoder_decoder":
        decode = model.decode

        def forced(decoder_tokens, *args, decoder_positions, **kwargs):  # EOS wins from the
            logits = decode(decoder_tokens, *args, decoder_positions=decoder_positions,
                            **kwargs)  # 2nd output token (decoder position 1) on
            logits += (decoder_positions >= 1)[..., None] * boost[: logits.shape[-1]]
            return logits

        model.decode = forced
    else:
        forward = model.forward

        first_call = []

        def forced(tokens, positions, **kwargs):  # EOS wins after the first output token
            logits = forward(tokens, positions=positions, **kwargs)
            if not first_call:
                first_call.append(kwargs["prefix_len"])  # the prompt lengths
            after = positions >= first_call[0][:, None]  # [b, len]
            logits += after[..., None] * boost[: logits.shape[-1]]
            return logits

        model.forward = forced
    outs = generate(model, tok, prompts, opts)
    assert outs == [[f[0], tok.eos_id] for f in free]
    assert all(tok.eos_id not in f[:1] for f in free)


# ---- Incremental decoding (megarch.model.KVCache) against rerunning the whole sequence ----

CACHE_PROMPTS = ["Once upon a time there was", "hi", "The answer is: 42, or", "abc"]


def _traced(model, tok, prompts, opts, generator=None):
    """Generated ids, each step's logits, and the token widths the model was fed."""
    steps, widths = [], []
    handle = model.embed.register_forward_hook(lambda mod, args, out: widths.append(
        tuple(args[0].shape)))
    try:
        out = generate(model, tok, prompts, opts, generator=generator,
                       on_logits=lambda logits: steps.append(logits.clone()))
    finally:
        handle.remove()
    return out, steps, widths


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_gives_the_tokens_and_logits_of_full_reruns(models, tok, arch):
    model = models[arch]
    prompts = [tok.encode(p) for p in CACHE_PROMPTS]  # unequal lengths: 2 to 27 tokens
    greedy = GenerationOptions(max_new_tokens=8)
    cached, cached_logits, widths = _traced(model, tok, prompts, greedy)
    full, full_logits, _ = _traced(model, tok, prompts, replace(greedy, use_cache=False))
    assert cached == full
    assert len({t for o in full for t in o}) > 5
    assert len(cached_logits) == len(full_logits) == 8
    for step, (got, want) in enumerate(zip(cached_logits, full_logits, strict=True)):
        rel = (got - want).norm(dim=-1) / want.norm(dim=-1)  # per row
        assert float(rel.max()) <= 1e-5, (step, rel)
    # The cache was used: after the prompt pass (and the encoder's), one token per row.
    fed = widths[2:] if arch == "encoder_decoder" else widths[1:]
    assert fed == [(len(prompts), 1)] * 7
    sampled = replace(greedy, temperature=0.9, top_k=40)
    outs = [generate(model, tok, prompts, replace(sampled, use_cache=use),
                     generator=torch.Generator().manual_seed(5)) for use in (True, False)]
    assert outs[0] == outs[1] and outs[0] != full


def _step_through(model, tokens, prefill_lens, encoder_out=None):
    """Logits of every position past each row's prefill, fed one token at a time through a
    cache after one padded prefill pass; [batch, len, vocab] (zeros before the prefill ends)."""
    batch, length = tokens.shape
    cache = KVCache(length)
    lengths = torch.tensor(prefill_lens)
    width = max(prefill_lens)
    segments = (torch.arange(width)[None, :] < lengths[:, None]).long()
    out = torch.zeros(batch, length, model.cfg.vocab_size)
    if encoder_out is None:
        first = model(tokens=tokens[:, :width], segment_ids=segments, prefix_len=lengths,
                      cache=cache)
    else:
        first = model.decode(tokens[:, :width], encoder_out, decoder_segment_ids=segments,
                             cache=cache)
    rows = torch.arange(batch)
    out[rows, lengths - 1] = first[rows, lengths - 1]
    for pos in range(min(prefill_lens), length):
        # Rows whose prefill covers pos re-feed that token: same slot, same keys/values.
        positions = torch.maximum(torch.full((batch,), pos), lengths - 1)[:, None]
        new = tokens.gather(1, positions)
        if encoder_out is None:
            logits = model(tokens=new, positions=positions, cache=cache)
        else:
            logits = model.decode(new, encoder_out, decoder_positions=positions, cache=cache)
        out[rows, positions[:, 0]] = logits[:, 0]
    return out


@pytest.mark.parametrize("position", ["t5_relative", "rotary"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_steps_equal_the_plain_forward(arch, position):
    model = tiny(arch, seed=2, tie_embeddings=False, position=position)
    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (3, 11))
    prefill = [4, 7, 1]
    encoder_out = None
    with torch.no_grad():
        if arch == "encoder_decoder":
            encoder_out = model.encode(torch.randint(0, 500, (3, 6)))
        got = _step_through(model, tokens, prefill, encoder_out)
        for row, n in enumerate(prefill):  # each row alone, unpadded, no cache
            if encoder_out is None:
                want = model(tokens=tokens[row : row + 1], prefix_len=torch.tensor([n]))[0]
            else:
                want = model.decode(tokens[row : row + 1], encoder_out[row : row + 1])[0]
            rel = (got[row, n - 1 :] - want[n - 1 :]).norm() / want[n - 1 :].norm()
            assert float(rel) <= 1e-5, (row, float(rel))
            if arch == "nonc_decoder" and n > 1:  # the prefix is bidirectional: not causal
                causal = model(tokens=tokens[row : row + 1, :n], prefix_len=torch.tensor([0]))
                assert not torch.allclose(causal[0, -1], want[n - 1], atol=1e-4)


def test_cache_refuses_misuse():
    model = tiny("causal_decoder")
    cache = KVCache(4)
    with torch.no_grad():
        model(tokens=torch.zeros(2, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="positions"):
            model(tokens=torch.zeros(2, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="capacity 4"):
            model(tokens=torch.zeros(2, 1, dtype=torch.long), positions=torch.full((2, 1), 4),
                  cache=cache)
        with pytest.raises(ValueError, match="batch"):
            model(tokens=torch.zeros(3, 1, dtype=torch.long), positions=torch.full((3, 1), 3),
                  cache=cache)
        # one slot per position: repeated positions (left padding at 0) are refused, and a
        # refused prefill leaves the cache unfilled (the next pass is still the prefill)
        fresh = KVCache(8)
        with pytest.raises(ValueError, match="distinct positions"):
            model(tokens=torch.zeros(1, 4, dtype=torch.long),
                  positions=torch.tensor([[0, 0, 0, 1]]), cache=fresh)
        assert not fresh.prefilled
        model(tokens=torch.zeros(1, 4, dtype=torch.long), cache=fresh)
        assert fresh.prefilled


@pytest.mark.parametrize("arch", ["causal_decoder", "nonc_decoder", "encoder_decoder"])
def test_cached_steps_see_only_their_segment(arch):
    """Left padding and packed rows in the prefill: a step continues each row's last segment
    and sees none of the padding or the other segments, as the plain forward with the same
    segment ids computes it."""
    model = tiny(arch, seed=3)
    tokens = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    segments = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2]])
    new = torch.tensor([[9], [9]])
    full_tokens, full_segments = torch.cat([tokens, new], 1), torch.cat([segments,
                                                                          segments[:, -1:]], 1)
    with torch.no_grad():
        cache = KVCache(8)
        if arch == "encoder_decoder":
            enc = model.encode(torch.tensor([[4, 3, 2], [7, 7, 7]]))
            model.decode(tokens, enc, decoder_segment_ids=segments, cache=cache)
            step = model.decode(new, enc, decoder_positions=torch.full((2, 1), 6),
                                cache=cache)[:, -1]
            full = model.decode(full_tokens, enc, decoder_segment_ids=full_segments)[:, -1]
        else:
            model(tokens=tokens, segment_ids=segments, cache=cache)
            step = model(tokens=new, positions=torch.full((2, 1), 6), cache=cache)[:, -1]
            full = model(tokens=full_tokens, segment_ids=full_segments)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["nonc_decoder",
                                  pytest.param("encoder_decoder", marks=pytest.mark.slow)])
def test_cached_prefill_through_the_attention_kernel(models, tok, arch, monkeypatch):
    """With the Triton kernel serving attention (the interpreter on CPU) the cached prefill
    dispatches to it, and generation still gives the reference path's tokens."""
    attention_module = importlib.import_module("megarch.model.attention")
    calls = []
    kernel = attention_module._kernel_attention
    monkeypatch.setattr(attention_module, "_kernel_attention",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    prompts = [tok.encode(p) for p in PROMPTS]
    opts = GenerationOptions(max_new_tokens=4)
    monkeypatch.setenv("MEGARCH_ATTENTION", "reference")
    want = generate(models[arch], tok, prompts, replace(opts, use_cache=False))
    assert not calls
    monkeypatch.setenv("MEGARCH_ATTENTION", "kernel")
    assert generate(models[arch], tok, prompts, opts) == want
    assert calls
