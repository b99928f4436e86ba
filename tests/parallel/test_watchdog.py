"""A stopped, hung or dead rank ends the job: group timeouts and the peer watchdog."""

from __future__ import annotations

import ast
import datetime
import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from megarch.parallel.context import ParallelContext
from megarch.parallel.spawn import SpawnError, free_port, spawn
from megarch.parallel.watchdog import DONE, PeerWatchdog, watched_ranks
from tests.training.helpers import REPO, fast_args


@pytest.mark.parametrize("world,local", [(2, 2), (8, 8), (16, 8), (6, 1), (12, 4)])
def test_every_rank_is_watched_and_siblings_watch_each_other(world, local):
    watchers = {r: watched_ranks(r, world, local) for r in range(world)}
    for rank, peers in watchers.items():
        assert rank not in peers and (rank + 1) % world in peers
        node = rank // local
        assert set(range(node * local, node * local + local)) - {rank} <= set(peers)
    assert {p for peers in watchers.values() for p in peers} == set(range(world))
    assert watched_ranks(0, 1, 1) == []


def test_watchdog_names_a_silent_peer_and_forgets_a_finished_one():
    store = dist.HashStore()
    lost: list = []
    event = threading.Event()

    def on_lost(ranks, message, store):
        lost.append((ranks, message))
        event.set()

    store.set("beat/2", DONE)  # rank 2 finished: never reported
    store.set("beat/1", b"7")  # rank 1 beat once and went silent
    start = time.monotonic()
    dog = PeerWatchdog(store, 0, [1, 2], timeout_s=0.5, interval=0.05, on_lost=on_lost).start()
    assert event.wait(10), "the watchdog never reported the silent peer"
    waited = time.monotonic() - start
    dog.stop()
    assert 0.5 <= waited < 3
    [(ranks, message)] = lost
    assert ranks == [1] and "rank(s) 1 did not answer" in message and "timeout_s 0.5" in message
    assert store.get("beat/0") == DONE  # stop() tells the watchers


def test_a_live_peer_is_never_reported():
    store = dist.HashStore()
    lost: list = []
    peer = PeerWatchdog(store, 1, [], timeout_s=0.3, interval=0.05,
                        on_lost=lambda *a: lost.append(a)).start()
    dog = PeerWatchdog(store, 0, [1], timeout_s=0.3, interval=0.05,
                       on_lost=lambda *a: lost.append(a)).start()
    time.sleep(1.5)
    dog.stop()
    peer.stop()
    assert lost == []


def _subgroup_all_reduce_waits_on_a_silent_peer(rank: int, world: int) -> float:
    ctx = ParallelContext.build(tp=world, timeout_s=2.0)
    assert ctx.tp_group is not None
    if rank == 1:
        time.sleep(8)  # never joins the collective in time
        return 0.0
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=ctx.tp_group)
    except RuntimeError:
        return time.monotonic() - start
    raise AssertionError("the TP group's all-reduce did not time out")


def test_every_group_carries_the_timeout():
    """A TP-group collective waiting on a silent peer fails after parallel.timeout_s (2 s), not
    after the backend's 30-minute default."""
    try:
        waited = spawn(2, timeout_s=60)(_subgroup_all_reduce_waits_on_a_silent_peer)[0]
    except SpawnError as err:  # rank 1 may see the broken pair too: rank 0's time is the point
        assert "timed out" in str(err).lower() or "connection" in str(err).lower(), err
        return
    assert 1.5 <= waited < 7


def test_groups_are_made_only_through_the_context():
    """No bare dist.new_group outside ParallelContext.new_group (it would not carry the
    timeout)."""
    offenders = []
    for path in glob.glob(os.path.join(REPO, "megarch", "**", "*.py"), recursive=True):
        if path.endswith(os.path.join("parallel", "context.py")):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "new_group" and isinstance(
                    node.value, ast.Name) and node.value.id in ("dist", "distributed"):
                offenders.append(f"{path}:{node.lineno}")
    assert offenders == []


def _worker_pids(agent: int) -> dict[int, int]:
    """RANK -> pid of the workers torchrun's agent ``agent`` started."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            pid = int(stat.split("/")[2])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            found[int(env[b"RANK"])] = pid
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigstopped_rank_ends_a_real_tp2_job(embedded, tmp_path):
    """torchrun, TP2 cd_flm_tiny, parallel.timeout_s 5: SIGSTOP rank 1 mid-training; the job
    ends within the timeout plus a margin, naming rank 1."""
    timeout_s = 5
    out_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), "-m", "megarch.train", "--preset", "cd_flm_tiny", "-q",
           *fast_args(embedded, out_dir, 100000), "--run.save_every", "0",
           "--run.log_every", "1", "--parallel.tp", "2",
           "--parallel.timeout_s", str(timeout_s)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while not glob.glob(os.path.join(out_dir, "**", "metrics*"), recursive=True):
            assert agent.poll() is None, agent.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        time.sleep(2)  # a few steps in
        pids = _worker_pids(agent.pid)
        assert set(pids) == {0, 1}, pids
        stopped = pids[1]
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        out, _ = agent.communicate(timeout=timeout_s + 40)
        elapsed = time.monotonic() - start
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)
            except OSError:
                pass
    assert agent.returncode != 0
    assert elapsed < timeout_s + 15, f"the job took {elapsed:.0f} s to end: {out[-4000:]}"
    assert "rank(s) 1 did not answer" in out, out[-3000:]
    print(f"ended {elapsed:.1f} s after SIGSTOP")
    assert "exitcode" in out and ": 3" in out, out[-3000:]


def test_build_records_the_timeout():
    assert ParallelContext.single().timeout_s > 0
    assert datetime.timedelta(seconds=ParallelContext().timeout_s).total_seconds() == 300
