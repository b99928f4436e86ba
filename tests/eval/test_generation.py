"""Generation: greedy equals step-by-step argmax, EOS stops a row, padded ids never appear.

The models here have untied output projections: a tiny random model with tied embeddings
mostly repeats its last input token (EOS, after a prompt), which would test little.
"""

from __future__ import annotations

import pytest
import torch

from megarch.eval.generation import GenerationOptions, generate, generate_text, next_token
from tests.eval.helpers import ARCHS, reference_greedy, tiny

PROMPTS = ["Once upon a time", "hi", "The answer is: 42, or"]


def untied(arch: str, seed: int = 0) -> torch.nn.Module:
    return tiny(arch, seed=seed, tie_embeddings=False)


@pytest.fixture(scope="module")
def models():
    return {arch: untied(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_stepwise_argmax(models, tok, arch):
    model = models[arch]
    ids = [tok.encode(p) for p in PROMPTS]
    got = generate(model, tok, ids, GenerationOptions(max_new_tokens=6))
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


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_after_the_first_token_stops_every_row(tok, arch):
    model = untied(arch)
    prompts = [tok.encode(p) for p in PROMPTS]
    free = generate(model, tok, prompts, GenerationOptions(max_new_tokens=4))
    boost = torch.zeros(tok.vocab_size + 1000)
    boost[tok.eos_id] = 1e4
    if arch == "encoder_decoder":
        decode = model.decode

        def forced(decoder_tokens, *args, **kwargs):  # EOS wins from the 2nd output token on
            logits = decode(decoder_tokens, *args, **kwargs)
            logits[:, 1:] += boost[: logits.shape[-1]]
            return logits

        model.decode = forced
    else:
        forward = model.forward

        def forced(tokens, prefix_len=None, **kwargs):
            logits = forward(tokens, prefix_len=prefix_len, **kwargs)
            after = torch.arange(tokens.shape[1])[None, :] >= prefix_len[:, None]  # [b, len]
            logits += after[..., None] * boost[: logits.shape[-1]]
            return logits

        model.forward = forced
    outs = generate(model, tok, prompts, GenerationOptions(max_new_tokens=4))
    assert outs == [[f[0], tok.eos_id] for f in free]
    assert all(tok.eos_id not in f[:1] for f in free)
