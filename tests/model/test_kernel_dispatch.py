"""The model's attention dispatch to the Triton kernel gives the reference path's results.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel import), forced with MEGARCH_ATTENTION=kernel; on CUDA it is the default path.
"""

import importlib
from dataclasses import replace

import pytest
import torch

from kernels.flash_attention import CAUSAL, dropout_mask, flash_attention_ref
from megarch.config.presets import get_model_preset
from megarch.model import build_model
from megarch.model.attention import MaskMode
from megarch.parallel.spawn import spawn

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


# ---- attention dropout in the kernel ---------------------------------------------------------


def _kernel_mask_dropout(x, p, group, training=True):
    """``split_dropout`` for the reference path that drops what the kernel drops: the same
    seed draw (``kernel_dropout_seed``) and the kernel's mask for it (``dropout_mask``)."""
    if not training or p == 0.0:
        return x
    seed = attention_module.kernel_dropout_seed(group)
    return x * dropout_mask(seed, tuple(x.shape), p, device=x.device) / (1.0 - p)


def _train_step(model, batch: dict, seed: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(seed)
    logits = model(**batch)
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _assert_same(a: tuple, b: tuple, exact: bool = False) -> None:
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(logits_a, logits_b, **tol)
    assert set(grads_a) == set(grads_b)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, msg=name,
                                   **(tol if exact else {"rtol": 1e-3, "atol": 1e-5}))


@pytest.mark.parametrize("arch", ["nd", pytest.param("ed", marks=pytest.mark.slow)])
def test_kernel_dropout_matches_the_reference_given_the_same_masks(arch, monkeypatch):
    """Training with attention dropout 0.2: the kernel serves it; the run's torch seed fixes
    the output; the reference path applying the kernel's masks gives the same logits and
    gradients; with activation checkpointing the recomputed forward draws the same masks."""
    config = replace(get_model_preset(f"{arch}_tiny"), dropout=0.2)
    torch.manual_seed(0)
    model = build_model(config).train()
    batch = _batch("encoder_decoder" if arch == "ed" else "decoder",
                   torch.Generator().manual_seed(1))
    calls = []
    monkeypatch.setattr(attention_module, "_kernel_attention",
                        _counting(attention_module._kernel_attention, calls))
    monkeypatch.setenv("MEGARCH_ATTENTION", "kernel")
    kernel = _train_step(model, batch, seed=5)
    assert calls
    _assert_same(_train_step(model, batch, seed=5), kernel, exact=True)
    other = _train_step(model, batch, seed=6)
    assert not torch.allclose(other[0], kernel[0])

    checkpointed = build_model(replace(config, activation_checkpointing=True)).train()
    checkpointed.load_state_dict(model.state_dict())
    _assert_same(_train_step(checkpointed, batch, seed=5), kernel)

    monkeypatch.setenv("MEGARCH_ATTENTION", "reference")
    monkeypatch.setattr(attention_module, "split_dropout", _kernel_mask_dropout)
    n_calls = len(calls)
    reference = _train_step(model, batch, seed=5)
    assert len(calls) == n_calls  # the reference path really served it
    _assert_same(kernel, reference)


def _tp2_kernel_dropout(rank: int, world: int) -> dict:
    """Kernel attention with dropout over a 2-rank TP group, identical inputs on both ranks."""
    import torch.distributed as dist

    from megarch.parallel.rng import rank_seed

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))
    group = dist.group.WORLD
    torch.manual_seed(11)
    out = attention_module.attention(q, k, v, MaskMode.CAUSAL, dropout_p=0.3,
                                     dropout_group=group)
    torch.manual_seed(11)
    base = int(torch.randint(1 << 62, ()).item())
    mask = dropout_mask(rank_seed(base, rank), (1, 2, 20, 20), 0.3)
    ref = flash_attention_ref(q.double(), k.double(), v.double(), CAUSAL, dropout_p=0.3,
                              dropout_mask=mask).float()
    return {"out": out, "ref": ref}


def test_tensor_parallel_ranks_draw_their_own_kernel_masks(monkeypatch):
    """Under TP each rank's kernel uses rank_seed(base, tp_rank) (megarch.parallel.rng):
    same inputs, different masks on the two ranks, each the reference with its own mask."""
    monkeypatch.setenv("MEGARCH_ATTENTION", "kernel")  # inherited by the spawned ranks
    results = spawn(2)(_tp2_kernel_dropout)
    for result in results:
        torch.testing.assert_close(result["out"], result["ref"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[0]["out"], results[1]["out"])
