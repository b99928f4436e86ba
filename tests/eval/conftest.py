"""Eval tests run single-threaded on tiny random models with the byte tokenizer."""

from __future__ import annotations

import pytest

from megarch.data.tokenizers import load_tokenizer
from tests.eval.helpers import ARCHS, tiny
from tests.threads import single_threaded_package

one_thread = single_threaded_package()


@pytest.fixture(scope="session")
def tok():
    """The byte tokenizer (vocabulary 359; the tiny models pad it to 512)."""
    return load_tokenizer("bytes")


@pytest.fixture(scope="session")
def models():
    """One tiny random model per architecture (eval mode)."""
    return {arch: tiny(arch, seed=0) for arch in ARCHS}
