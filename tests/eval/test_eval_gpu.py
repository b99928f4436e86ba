"""Evaluation on a GPU (``-m gpu``; skipped without CUDA): the same tiny models score and
generate on CUDA as on the CPU. On CUDA the attention runs in the Triton kernel (fp32 here),
so scores agree to float tolerance rather than bitwise; the CPU run is the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from megarch.eval.generation import GenerationOptions, generate
from megarch.eval.scoring import score_continuations
from tests.eval.helpers import ARCHS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The cat sat on", "Is fire hot?", "a"]
CHOICES = [" the mat", " yes", " no, not at all"]


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_and_generation_on_cuda_match_the_cpu(models, tok, arch):
    cpu = models[arch]
    gpu = copy.deepcopy(cpu).cuda().eval()
    pairs = [(tok.encode(p), tok.encode(c)) for p in PROMPTS for c in CHOICES]
    kwargs = {"vocab_size": tok.vocab_size, "start_id": tok.bos_id, "pad_id": tok.pad_id,
              "batch_size": 4}
    want = score_continuations(cpu, pairs, **kwargs)
    got = score_continuations(gpu, pairs, **kwargs)
    for w, g in zip(want, got, strict=True):
        assert g.n_tokens == w.n_tokens
        assert g.logprob == pytest.approx(w.logprob, rel=1e-4, abs=1e-4)
    prompts = [tok.encode(p) for p in PROMPTS]
    options = GenerationOptions(max_new_tokens=8)
    steps_cpu: list[torch.Tensor] = []
    steps_gpu: list[torch.Tensor] = []
    generate(cpu, tok, prompts, options, on_logits=lambda x: steps_cpu.append(x.cpu()))
    cached = generate(gpu, tok, prompts, options, on_logits=lambda x: steps_gpu.append(x.cpu()))
    uncached = generate(gpu, tok, prompts, GenerationOptions(max_new_tokens=8, use_cache=False))
    assert cached == uncached  # the key/value cache on CUDA
    for a, b in zip(steps_cpu, steps_gpu, strict=False):  # the same first-step logits at least
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
        break
