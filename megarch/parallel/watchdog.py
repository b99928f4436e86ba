"""Peer watchdog: a stopped, hung or dead rank ends the whole job within ``parallel.timeout_s``.

Collective timeouts (every group carries ``parallel.timeout_s``, megarch.parallel.context) end
a rank that *waits* on a dead peer, but not every failure reaches a collective in time: a rank
that is SIGSTOPped, stuck in I/O or spinning in a kernel leaves its peers blocked inside NCCL
(whose timeouts fire only with async error handling on), and a peer blocked in a long
compute-only stretch is never asked anything. So each rank also runs a small heartbeat thread:

- every ``interval`` seconds it bumps its counter in the job's TCP store (the one torchrun's
  rendezvous already serves at ``MASTER_ADDR:MASTER_PORT``; a prefix per restart keeps
  attempts apart);
- it watches a few peers (:func:`watched_ranks`: the next rank on the ring, so every rank is
  watched by someone, plus the other ranks of its own node, so a stopped sibling is found fast);
- a watched counter that stays unchanged for longer than ``timeout_s`` ends this process with
  one line naming the silent rank(s) and exit status :data:`EXIT_PEER_LOST`; torchrun then
  stops the other workers. A silent rank on this host is SIGKILLed first (every rank records
  its host and pid in the store): a stopped or hung process cannot act on torchrun's SIGTERM,
  which would otherwise cost its 30-second grace period.
- a collective that fails (its group's timeout, a peer's closed connection) in a job with a
  watchdog goes through :meth:`PeerWatchdog.explain`: when watched peers have stopped beating,
  the job ends the same way, naming them, instead of with a traceback from inside gloo/NCCL.

A rank that finishes writes ``done`` and is no longer expected to answer. The thread only reads
and writes a few store keys: no tensors, no collectives, nothing that competes with training.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3
"""Exit status of a rank that ended the job because a peer stopped answering."""

DONE = b"done"


def watched_ranks(rank: int, world: int, local_world: int) -> list[int]:
    """The peers ``rank`` watches: the next rank on the ring and the rest of its node.

    Every rank is watched by at least one other (its predecessor on the ring)."""
    if world < 2:
        return []
    node = rank // local_world if local_world > 0 else 0
    peers = {(rank + 1) % world}
    if local_world > 1:
        peers.update(r for r in range(node * local_world, min((node + 1) * local_world, world)))
    peers.discard(rank)
    return sorted(peers)


class PeerWatchdog:
    """Heartbeats of this rank and checks of ``peers`` in ``store`` (see the module docstring).

    ``on_lost(ranks, message, store)`` is what happens when peers go silent; the default logs
    the message and ends the process (:func:`end_job`). Tests pass their own.
    """

    def __init__(self, store: dist.Store, rank: int, peers: list[int], timeout_s: float,
                 interval: float | None = None, on_lost=None):
        self.store, self.rank, self.peers = store, rank, list(peers)
        self.timeout_s = timeout_s
        self.interval = interval if interval is not None else max(0.05, min(1.0, timeout_s / 10))
        self.on_lost = on_lost or end_job
        self._stop = threading.Event()
        self._beat = 0
        self._last: dict[int, tuple[bytes, float]] = {}
        self._thread = threading.Thread(target=self._run, name="megarch-watchdog", daemon=True)

    def start(self) -> PeerWatchdog:
        self.store.set(f"pid/{self.rank}", f"{socket.gethostname()} {os.getpid()}".encode())
        self._heartbeat()
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop watching and tell the watchers this rank is done (idempotent; nothing after
        :meth:`explain`)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(f"beat/{self.rank}", DONE)
        except Exception:  # the store's host may already be gone at exit
            pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval + 1)

    def _heartbeat(self) -> None:
        self._beat += 1
        self.store.set(f"beat/{self.rank}", str(self._beat).encode())

    def _check(self) -> list[int]:
        """Beat once, read the watched peers; the ones silent for longer than ``timeout_s``."""
        self._heartbeat()
        now, silent = time.monotonic(), []
        for peer in list(self.peers):
            key = f"beat/{peer}"
            value = self.store.get(key) if self.store.check([key]) else b""
            if value == DONE:  # finished: no longer expected to answer
                self.peers.remove(peer)
            elif peer not in self._last or self._last[peer][0] != value:
                self._last[peer] = (value, now)
            elif now - self._last[peer][1] > self.timeout_s:
                silent.append(peer)
        return silent

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                silent = self._check()
            except Exception as err:  # noqa: BLE001 - store gone: the job is ending
                if not self._stop.is_set():
                    log.warning("rank %d: watchdog lost the job's store (%s); no longer "
                                "watching", self.rank, err)
                return
            if silent:
                self._lost(silent)
                return

    def _lost(self, silent: list[int]) -> None:
        now = time.monotonic()
        names = ", ".join(str(p) for p in silent)
        waited = max(now - self._last[p][1] for p in silent)
        self.on_lost(silent, f"rank {self.rank}: rank(s) {names} did not answer for "
                     f"{waited:.0f} s (parallel.timeout_s {self.timeout_s:g}): stopped, hung "
                     "or dead; ending the job", self.store)

    def explain(self, err: BaseException) -> None:
        """After ``err`` (a failed collective, say): when watched peers have stopped beating,
        end the job naming them (as when the watchdog finds them itself); else return."""
        if self._stop.is_set():
            return
        self._stop.set()  # the thread stops; this rank is failing and sends no "done"
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval + 1)
        deadline = time.monotonic() + 3 * self.interval + 0.5
        silent: list[int] = []
        try:
            while time.monotonic() < deadline:
                self._check()
                now = time.monotonic()
                silent = [p for p, (_, seen) in self._last.items()
                          if p in self.peers and now - seen > 3 * self.interval]
                time.sleep(self.interval)
        except Exception:  # noqa: BLE001 - no store: nothing to add to the error
            return
        if silent:
            self._lost(silent)


def end_job(ranks: list[int], message: str, store: dist.Store | None = None) -> None:
    """Log ``message``, SIGKILL the silent ``ranks`` running on this host and exit."""
    log.error(message)
    print(message, file=sys.stderr, flush=True)
    host = socket.gethostname()
    for rank in ranks:
        try:
            where = store.get(f"pid/{rank}").decode().split() if store is not None else []
            if len(where) == 2 and where[0] == host:
                os.kill(int(where[1]), signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone, or its pid was never recorded
            pass
    os._exit(EXIT_PEER_LOST)


def store_from_env(timeout_s: float) -> dist.Store | None:
    """A client of the job's TCP store (torchrun's ``MASTER_ADDR``/``MASTER_PORT``), with a
    prefix per restart; None when the environment names no store."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    store = dist.TCPStore(addr, int(port), is_master=False,
                          timeout=timedelta(seconds=max(timeout_s, 30)))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"megarch/watchdog/{restart}", store)


def start_watchdog(rank: int, world: int, timeout_s: float) -> PeerWatchdog | None:
    """Start this rank's watchdog in a multi-process job (None in one process or when the job's
    store cannot be reached, with a warning)."""
    if world < 2:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        store = store_from_env(timeout_s)
    except Exception as err:  # noqa: BLE001 - the watchdog is a safety net, never a blocker
        log.warning("rank %d: no peer watchdog (job store unreachable: %s)", rank, err)
        return None
    if store is None:
        return None
    return PeerWatchdog(store, rank, watched_ranks(rank, world, local_world), timeout_s).start()
