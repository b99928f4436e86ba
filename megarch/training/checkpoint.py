"""Checkpoints: everything needed to continue a run bit for bit, published atomically.

A checkpoint is one directory per step for the whole job, ``{out_dir}/checkpoints/step_{step:08d}``,
holding

- ``model.safetensors``: the model's state dict (safetensors: read tensor by tensor, memory-mapped,
  and no code in it to run);
- ``optimizer.pt``: the optimizer's state dict, plus ``param_names`` (the parameter name of each
  state index, so the state can be resharded by name); nested, so ``torch.save``, and read back
  only with ``torch.load(weights_only=True)`` (tensors and plain containers, never objects);
- ``rng.safetensors``: the torch (CPU and CUDA) generator states as uint8 tensors, Python's and
  NumPy's Mersenne-Twister keys as int64 tensors, their few scalars as JSON in the header;
- ``state.json``: step, consumed samples (the data position), tokens seen, skipped steps;
- ``config.json``: the resolved :class:`~megarch.config.train.TrainConfig`;
- ``lineage.json`` (when the run keeps one): the stages that made these weights, e.g.
  pretraining then adaptation (see :mod:`megarch.training.adapt`, :func:`read_lineage`);
- ``manifest.json``: the size and checksum of every other file (CRC32C through google-crc32c,
  else zlib's CRC32; the algorithm is recorded), checked when the checkpoint is read
  (:func:`verify_file`).

A tensor- or pipeline-parallel job (config ``parallel.tp`` x ``parallel.pp`` > 1) writes, instead
of the first three, one set per (TP rank, stage): ``model_tpTT_ppPP.safetensors``,
``optimizer_tpTT_ppPP.pt`` and ``rng_tpTT_ppPP.safetensors`` (:func:`shard_file`), each written
by data-parallel rank 0 of that shard (ZeRO-1 state gathered first). The other data-parallel
ranks write only their RNG states (``rng_tpTT_ppPP_dpDD.safetensors``, :func:`rng_file`; their
dropout streams differ), under any layout. Parameter names are the
single-process model's on every stage (``blocks.<global index>...``), so any layout can be read
back into any other (megarch.training.resume).

Every rank writes into ONE temporary directory ``step_N.tmp-save`` beside the step, with the
size and checksum of each file it wrote beside it (``NAME.sum``, computed while the file is
still in the page cache); after a barrier the main rank merges those into ``manifest.json``,
adds config, lineage and ``state.json`` (last) and renames the directory into place, so a step
is complete for every rank or for none. A job killed mid-write leaves only the temporary
directory, which :func:`find_latest` ignores and the next save removes. Multi-node jobs need
``out_dir`` on a filesystem every node shares (each rank writes its own files there).

Asynchronous saves (``run.async_save``, :func:`start_checkpoint`): at the step every rank
copies what it writes (model and optimizer tensors, RNG states) to host memory, after the
same collectives as a synchronous save (ZeRO-1 consolidation, the existence check), and a
background thread writes the files; each rank then leaves a ``ready-RANK`` marker, and the main
rank's thread, once every rank's marker is there, writes the manifest and the JSON files and
renames the directory into place. No collective runs off the main thread. The trainer waits
for a save in flight before it starts the next one, at SIGTERM and at the end of training, so
at most one is in flight and a crash mid-write leaves the previous checkpoint the newest.

Checkpoints of older megarch versions held pickled ``model.pt`` / ``rng.pt`` files and no
manifest; they are refused (:mod:`megarch.training.checkpoint_files`, which holds the formats
and the checks) with the command that converts them (``tools/migrate_checkpoint.py``), never
unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from megarch.parallel.context import ParallelContext
from megarch.parallel.data_parallel import any_over
from megarch.parallel.reshard import optimizer_param_names
from megarch.training.checkpoint_files import (  # the names callers know from here too
    CONFIG_FILE,
    DAMAGED,
    LINEAGE_FILE,
    STATE_FILE,
    SUM_SUFFIX,
    CheckpointError,
    file_entry,
    rng_file,
    save_model_file,
    save_rng_file,
    shard_file,
    write_manifest,
)

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
PARAM_NAMES = "param_names"
"""Key of the optimizer file listing each state index's parameter name."""
TEMPORARY_SUFFIX = ".tmp-save"
"""The one temporary directory of a step being written (``step_N.tmp-save``)."""
KILL_IN_SAVE_ENV = "MEGARCH_TEST_KILL_IN_SAVE"
"""Test hook: the step whose save SIGKILLs the writing process halfway through its files."""


@dataclass
class TrainState:
    """Where a run is: what a checkpoint records besides tensors."""

    step: int = 0
    """Optimizer steps done (skipped non-finite steps included)."""
    consumed_samples: int = 0
    """Training samples read so far: the data loader restarts here."""
    tokens_seen: int = 0
    """Input tokens processed (both sides for encoder-decoders)."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss or gradient."""


def checkpoint_dir(out_dir: str) -> str:
    """The folder holding the run's checkpoints."""
    return os.path.join(out_dir, "checkpoints")


def step_path(out_dir: str, step: int) -> str:
    """The checkpoint directory of ``step``."""
    return os.path.join(checkpoint_dir(out_dir), f"step_{step:08d}")



def is_own_checkpoint(path: str | None, out_dir: str) -> bool:
    """True when ``path`` is a step of ``out_dir``'s own checkpoints (a resume, not a start
    from another run's weights)."""
    if path is None:
        return False
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(checkpoint_dir(out_dir))


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first; temporary dirs are ignored."""
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(out_dir: str) -> str | None:
    """The newest complete checkpoint in ``out_dir``, or None."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1][1] if checkpoints else None


def _record_sum(file: str) -> None:
    """Write ``file``'s entry beside it (``NAME.sum``), for the manifest."""
    _write_json(file + SUM_SUFFIX, json.dumps(file_entry(file)))


def _collect_sums(directory: str) -> dict[str, dict]:
    """The ``NAME.sum`` records the ranks left in ``directory`` (removed)."""
    entries = {}
    for name in os.listdir(directory):
        if name.endswith(SUM_SUFFIX):
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as f:
                entries[name[: -len(SUM_SUFFIX)]] = json.load(f)
            os.remove(path)
    return entries


def rng_state() -> dict:
    """The Python, NumPy and torch random states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` (or :func:`read_rng_file`) returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _maybe_die_mid_write(step: int) -> None:
    """The test hook of :data:`KILL_IN_SAVE_ENV`: a real SIGKILL inside the write."""
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
        log.warning("test hook %s=%d: killing this process mid-write", KILL_IN_SAVE_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


def optimizer_record(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What the optimizer file holds: the optimizer's state dict and ``param_names``."""
    return {**optimizer.state_dict(), PARAM_NAMES: optimizer_param_names(model, optimizer)}


def write_shard(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                ctx: ParallelContext, step: int) -> None:
    """Write this rank's model, optimizer and RNG files of a step into ``directory``."""
    _write_snapshot(directory, model.state_dict(), optimizer_record(model, optimizer),
                    rng_state(), ctx, step)


def _write_snapshot(directory: str, model_state: dict, optimizer: dict, rng: dict,
                    ctx: ParallelContext, step: int) -> None:
    def name(kind: str) -> str:
        return os.path.join(directory, shard_file(kind, ctx.tp_rank, ctx.pp_rank, ctx.tp, ctx.pp))

    save_model_file(model_state, name("model"))
    _record_sum(name("model"))
    _maybe_die_mid_write(step)
    torch.save(optimizer, name("optimizer"))
    _record_sum(name("optimizer"))
    save_rng_file(rng, name("rng"))
    _record_sum(name("rng"))


def _host_copy(value):
    """``value`` with every tensor copied to host memory (containers rebuilt); device tensors
    go to pinned memory without blocking, then one synchronisation."""
    on_device = []

    def copy(item):
        if torch.is_tensor(item):
            if item.device.type == "cpu":
                return item.detach().clone()
            out = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
            on_device.append(item.device)
            return out.copy_(item.detach(), non_blocking=True)
        if isinstance(item, dict):
            return {k: copy(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return type(item)(copy(v) for v in item)
        return item

    out = copy(value)
    for device in set(on_device):
        torch.cuda.synchronize(device)
    return out


def _write_json(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _begin_save(out_dir: str, step: int, optimizer: torch.optim.Optimizer,
                ctx: ParallelContext) -> tuple[str, str | None]:
    """The collective start of every save: (the step's path, its fresh temporary directory),
    or (path, None) when the step already has a checkpoint (the main rank's view decides for
    all: a shared filesystem's caches may disagree). ZeRO-1 state is gathered first."""
    path = step_path(out_dir, step)
    if any_over(ctx.is_main and os.path.isfile(os.path.join(path, STATE_FILE)),
                ctx.world_group):
        return path, None
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO-1: gather the shards
        optimizer.consolidate_state_dict(to=0)
    tmp = path + TEMPORARY_SUFFIX
    if ctx.is_main:
        os.makedirs(checkpoint_dir(out_dir), exist_ok=True)
        _remove_stale_temporaries(out_dir)
        os.makedirs(tmp)
    ctx.barrier()
    return path, tmp


def _write_rng_only(tmp: str, rng: dict, ctx: ParallelContext) -> None:
    """A data-parallel rank but 0: only its own RNG (dropout) stream."""
    file = os.path.join(tmp, rng_file(ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.tp, ctx.pp))
    save_rng_file(rng, file)
    _record_sum(file)


def save_checkpoint(
    out_dir: str,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config_json: str,
    keep_last: int = 0,
    lineage: dict | None = None,
    ctx: ParallelContext | None = None,
) -> str:
    """Write the checkpoint of ``state.step`` atomically; keep the newest ``keep_last`` (0: all).

    Collective under parallelism (``ctx``): every rank calls it; ZeRO-1 state is gathered to
    data-parallel rank 0, which writes this (TP rank, stage)'s files into the step's one
    temporary directory; the main rank then writes ``config_json``, ``lineage`` (JSON-able, as
    ``lineage.json``) and the state, and publishes the directory. Returns the checkpoint's path
    on every rank. Saving a step that already has a checkpoint keeps it.
    """
    ctx = ctx or ParallelContext.single()
    path, tmp = _begin_save(out_dir, state.step, optimizer, ctx)
    if tmp is None:
        return path
    if ctx.dp_rank == 0:
        write_shard(tmp, model, optimizer, ctx, state.step)
    else:  # its own dropout stream
        _write_rng_only(tmp, rng_state(), ctx)
    ctx.barrier()  # every shard is on disk (a rank that died raises here on the others)
    if ctx.is_main:
        _publish(tmp, path, _texts(config_json, lineage, state), out_dir, state.step,
                 keep_last)
    ctx.barrier()
    return path


def _texts(config_json: str, lineage: dict | None, state: TrainState) -> dict[str, str]:
    """The JSON files of a checkpoint, state.json last (its presence marks it complete)."""
    texts = {CONFIG_FILE: config_json}
    if lineage is not None:
        texts[LINEAGE_FILE] = json.dumps(lineage, indent=2)
    texts[STATE_FILE] = json.dumps(asdict(state), indent=2)
    return texts


def _publish(tmp: str, path: str, texts: dict[str, str], out_dir: str, step: int,
             keep_last: int) -> None:
    """The main rank's end of a save: the manifest of the ranks' files, the JSON files, the
    rename into place, then pruning to ``keep_last`` (the older ones only)."""
    write_manifest(tmp, _collect_sums(tmp), texts)
    for name, text in texts.items():
        _write_json(os.path.join(tmp, name), text)
    os.rename(tmp, path)
    log.info("saved checkpoint %s", path)
    if keep_last:  # never this step, nor a newer one
        older = [p for s, p in list_checkpoints(out_dir) if s < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove_checkpoint(old)


class PendingSave:
    """A checkpoint being written in the background (:func:`start_checkpoint`)."""

    def __init__(self, path: str, work, name: str):
        self.path = path
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - raised again by wait() on the main thread
            self._error = err

    def wait(self) -> str:
        """Block until this rank's part (the main rank: the publish too) is done; raise what
        went wrong in the background."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background save of {self.path} failed: {error}") \
                from error
        return self.path


def start_checkpoint(
    out_dir: str,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config_json: str,
    keep_last: int = 0,
    lineage: dict | None = None,
    ctx: ParallelContext | None = None,
) -> PendingSave | str:
    """:func:`save_checkpoint` with the file writes in the background (see the module
    docstring): collective like it, returns once this rank's state is copied to host memory,
    as a :class:`PendingSave` (the path, when the step already has a checkpoint). Call
    ``wait()`` on it before the next save and before exiting."""
    ctx = ctx or ParallelContext.single()
    path, tmp = _begin_save(out_dir, state.step, optimizer, ctx)
    if tmp is None:
        return path
    rng, step = rng_state(), state.step
    snapshot = None
    if ctx.dp_rank == 0:
        snapshot = (_host_copy(model.state_dict()),
                    _host_copy(optimizer_record(model, optimizer)))
    texts = _texts(config_json, lineage, state)

    def write() -> None:
        if snapshot is not None:
            _write_snapshot(tmp, *snapshot, rng, ctx, step)
        else:  # its own dropout stream
            _write_rng_only(tmp, rng, ctx)
        _write_json(os.path.join(tmp, f"ready-{ctx.rank}"), "")
        if ctx.is_main:
            _publish_when_ready(tmp, path, texts, ctx, out_dir, step, keep_last)

    return PendingSave(path, write, f"megarch-save-{step}")


def _publish_when_ready(tmp: str, path: str, texts: dict[str, str], ctx: ParallelContext,
                        out_dir: str, step: int, keep_last: int) -> None:
    """The main rank's background publish: once every rank's ``ready-RANK`` marker is in
    ``tmp`` (waiting at most ``ctx.timeout_s``), the manifest, the JSON files and the rename."""
    markers = [os.path.join(tmp, f"ready-{r}") for r in range(ctx.world_size)]
    deadline = time.monotonic() + ctx.timeout_s
    while not all(os.path.exists(m) for m in markers):
        if time.monotonic() > deadline:
            missing = [r for r, m in enumerate(markers) if not os.path.exists(m)]
            raise CheckpointError(f"ranks {missing} did not finish writing {tmp} within "
                                  f"parallel.timeout_s {ctx.timeout_s:g}; not published")
        time.sleep(0.02)
    for marker in markers:
        os.remove(marker)
    _publish(tmp, path, texts, out_dir, step, keep_last)


def _remove_checkpoint(path: str) -> None:
    """Delete a checkpoint: renamed out of the ``step_N`` names first, so a kill mid-delete
    leaves a temporary (removed by the next save), never a partial step that looks whole."""
    doomed = path + ".tmp-delete"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_temporaries(out_dir: str) -> None:
    root = checkpoint_dir(out_dir)
    for name in os.listdir(root):
        if ".tmp-" in name:
            log.info("removing an incomplete checkpoint write %s", name)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_state(path: str) -> TrainState:
    """The :class:`TrainState` of checkpoint ``path``, its fields validated (every field a
    non-negative int, no other field)."""
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}): {DAMAGED}") from None
    problem = state_problem(values)
    if problem:
        raise CheckpointError(f"{file}: {problem}: {DAMAGED}")
    return TrainState(**values)


def state_problem(values) -> str | None:
    """What is wrong with the content of a ``state.json`` (None: a valid state)."""
    if not isinstance(values, dict):
        return f"holds {type(values).__name__}, not an object of the fields of TrainState"
    names = [f.name for f in fields(TrainState)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)} (known: {', '.join(names)})"
    for name in names:
        if name not in values:
            return f"field {name!r} is missing"
        value = values[name]
        if type(value) is not int:
            return f"field {name!r} is {value!r} ({type(value).__name__}), not an integer"
        if value < 0:
            return f"field {name!r} is {value}, not >= 0"
    if values["skipped_steps"] > values["step"]:
        return (f"field 'skipped_steps' is {values['skipped_steps']}, more than 'step' "
                f"{values['step']}")
    return None


def read_lineage(path: str) -> dict | None:
    """The ``lineage.json`` of checkpoint ``path``, or None when it has none."""
    file = os.path.join(path, LINEAGE_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}): {DAMAGED}") from None
