"""Eval tests run single-threaded on tiny random models with the byte tokenizer."""

from __future__ import annotations

import pytest
import torch

from megarch.data.tokenizers import load_tokenizer
from tests.eval.helpers import ARCHS, tiny


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    """The byte tokenizer (vocabulary 359; the tiny models pad it to 512)."""
    return load_tokenizer("bytes")


@pytest.fixture(scope="session")
def models():
    """One tiny random model per architecture (eval mode)."""
    return {arch: tiny(arch, seed=0) for arch in ARCHS}
