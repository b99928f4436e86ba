"""Model tests run single-threaded: their tensors are tiny, and on a shared 2-core machine
intra-op threads spin against other processes (measured 8 ms vs 250 ms per tiny step)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
