"""Single-threaded torch for test packages of tiny tensors.

On a shared 2-core machine intra-op threads spin against other processes (measured 8 ms vs
250 ms per tiny training step). A package's conftest opts in with
``one_thread = single_threaded_package()``.
"""

import pytest
import torch


def single_threaded_package():
    """An autouse, package-scoped fixture running the package's tests on one torch thread."""

    @pytest.fixture(autouse=True, scope="package")
    def _one_thread():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    return _one_thread
