"""Shared fixtures: the embedded corpus with a small vocabulary, built once per session."""

from __future__ import annotations

import os

import pytest

from megarch.data.embedded import prepare_embedded


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> str:
    """The directory of the embedded corpus (2,000-id vocabulary), as --data-dir takes it."""
    directory = tmp_path_factory.mktemp("embedded")
    prefix, _ = prepare_embedded(str(directory), vocab_size=2000, progress=False)
    return os.path.dirname(prefix)
