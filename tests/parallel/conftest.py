"""Distributed tests: the embedded corpus (small vocabulary) once per session; one thread in
the test process (spawned ranks set their own)."""

from __future__ import annotations

import pytest

from megarch.data.embedded import prepare_embedded
from tests.threads import single_threaded_package


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> tuple[str, str]:
    """(dataset prefix, tokenizer) of the embedded corpus with a 2,000-id vocabulary."""
    directory = tmp_path_factory.mktemp("embedded")
    return prepare_embedded(str(directory), vocab_size=2000, progress=False)


one_thread = single_threaded_package()
