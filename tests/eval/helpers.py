"""Tiny models and hand-written reference computations for the eval tests."""

from __future__ import annotations

import torch

from megarch.config.presets import tiny_model
from megarch.model import EncoderDecoderLM, build_model

ARCHS = ("causal_decoder", "nonc_decoder", "encoder_decoder")


def tiny(arch: str, seed: int = 0, **changes) -> torch.nn.Module:
    """A tiny random model of ``arch`` (vocabulary 512) in eval mode."""
    cfg = tiny_model(arch)
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@torch.no_grad()
def reference_logprob(model, context: list[int], continuation: list[int], vocab: int,
                      bos: int) -> float:
    """log p(continuation | context) from one unbatched, unpadded forward pass."""
    if isinstance(model, EncoderDecoderLM):
        logits = model(encoder_tokens=torch.tensor([context]),
                       decoder_tokens=torch.tensor([[bos] + continuation[:-1]]))[0]
        rows = logits[:, :vocab]
    else:
        full = [bos] + context + continuation
        logits = model(tokens=torch.tensor([full[:-1]]),
                       prefix_len=torch.tensor([len(context) + 1]))[0]
        rows = logits[len(context):, :vocab]
    logp = torch.log_softmax(rows.double(), dim=-1)
    return sum(float(logp[j, t]) for j, t in enumerate(continuation))


@torch.no_grad()
def reference_greedy(model, prompt: list[int], vocab: int, bos: int, eos: int,
                     max_new: int) -> list[int]:
    """Greedy decoding one token at a time, unbatched, without the library's code."""
    out: list[int] = []
    for _ in range(max_new):
        if isinstance(model, EncoderDecoderLM):
            logits = model(encoder_tokens=torch.tensor([prompt]),
                           decoder_tokens=torch.tensor([[bos] + out]))[0, -1]
        else:
            seq = [bos] + prompt + out
            logits = model(tokens=torch.tensor([seq]),
                           prefix_len=torch.tensor([len(prompt) + 1]))[0, -1]
        nxt = int(logits[:vocab].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out
