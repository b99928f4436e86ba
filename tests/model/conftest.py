"""Model tests run single-threaded: their tensors are tiny, and on a shared 2-core machine
intra-op threads spin against other processes (measured 8 ms vs 250 ms per tiny step)."""

from tests.threads import single_threaded_package

one_thread = single_threaded_package()
