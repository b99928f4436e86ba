"""The model's attention dispatch to the Triton kernel gives the reference path's results.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel import), forced with MEGARCH_ATTENTION=kernel; on CUDA it is the default path.
"""

import importlib

import pytest
import torch

from megarch.config.presets import get_model_preset
from megarch.model import build_model

attention_module = importlib.import_module("megarch.model.attention")  # the module, not the fn


def _counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def _batch(arch: str, generator: torch.Generator) -> dict:
    B, L = 2, 24
    tokens = torch.randint(3, 500, (B, L), generator=generator)
    segments = torch.ones(B, L, dtype=torch.long)
    segments[1, 14:] = 2  # a packed second segment
    segments[1, 21:] = 0  # and padding
    positions = torch.arange(L).repeat(B, 1)
    positions[1, 14:] = torch.arange(L - 14)
    if arch == "encoder_decoder":
        return {"encoder_tokens": tokens, "encoder_positions": positions,
                "encoder_segment_ids": segments, "decoder_tokens": tokens[:, :17],
                "decoder_positions": positions[:, :17], "decoder_segment_ids": segments[:, :17]}
    return {"tokens": tokens, "positions": positions, "segment_ids": segments,
            "prefix_len": torch.tensor([9, 5])}


@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_kernel_path_matches_reference(arch, monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_model_preset(f"{arch}_tiny"))
    batch = _batch("encoder_decoder" if arch == "ed" else "decoder",
                   torch.Generator().manual_seed(1))

    def run(path: str):
        monkeypatch.setenv("MEGARCH_ATTENTION", path)
        model.zero_grad()
        logits = model(**batch)
        (logits.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    calls = []
    monkeypatch.setattr(attention_module, "_kernel_attention",
                        _counting(attention_module._kernel_attention, calls))
    ref_logits, ref_grads = run("reference")
    assert not calls
    ker_logits, ker_grads = run("kernel")
    assert calls  # the kernel really served the second run
    torch.testing.assert_close(ker_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert set(ker_grads) == set(ref_grads)
    for name, grad in ref_grads.items():  # the bias tables' gradients included
        torch.testing.assert_close(ker_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
