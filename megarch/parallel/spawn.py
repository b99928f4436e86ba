"""Start real gloo process groups for tests and small tools: ``spawn(world_size)(fn)``.

    results = spawn(2)(my_function, arg)     # [result of rank 0, result of rank 1]

Each rank is a fresh ``spawn``-started process with the default process group initialised
(gloo, a free localhost port, a collective timeout). ``fn`` must be importable (a module-level
function) and gets ``(rank, world_size, *args)``; it runs with ``torch.distributed`` ready and
its return value (picklable) comes back. A failing rank raises :class:`SpawnError` naming the
rank and carrying its traceback; the other ranks are terminated rather than left waiting.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class SpawnError(RuntimeError):
    """A spawned rank failed (its traceback is in the message) or the job timed out."""


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(rank: int, world: int, port: int, timeout_s: float, fn: Callable, args: tuple,
              results: Any, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # world_size processes share the cores
    try:
        if backend == "nccl":  # one GPU a rank
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world, *args)
        # plain pickle bytes: the queue's own pickler would pass tensors as shared-memory
        # handles, which die with this process if it exits before the parent reads them
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including a collective timeout
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world_size: int, timeout_s: float = 120.0, backend: str = "gloo"
          ) -> Callable[..., list[Any]]:
    """A runner that calls ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo; or
    ``backend="nccl"``, rank r on GPU r) and returns the per-rank results in rank order.
    ``timeout_s`` bounds each collective and the whole job."""

    def run(fn: Callable, *args: Any) -> list[Any]:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_run_rank, args=(r, world_size, port, timeout_s, fn, args,
                                                     results, backend), daemon=True)
                 for r in range(world_size)]
        for proc in procs:
            proc.start()
        values: dict[int, Any] = {}
        failed = True
        try:
            while len(values) < world_size:
                try:
                    rank, ok, value = results.get(timeout=timeout_s)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise SpawnError(f"ranks {missing} gave no result in {timeout_s} s") from None
                if not ok:
                    raise SpawnError(f"rank {rank} of {world_size} failed:\n{value}")
                values[rank] = pickle.loads(value)
            failed = False
        finally:
            for proc in procs:  # after a failure the others may wait on it: stop them now
                proc.join(timeout=1 if failed else 30)
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
        return [values[r] for r in range(world_size)]

    return run
