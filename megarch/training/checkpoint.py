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

Checkpoints of older megarch versions held pickled ``model.pt`` / ``rng.pt`` files and no
manifest; they are refused (:func:`check_format`) with the command that converts them
(``tools/migrate_checkpoint.py``), never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megarch.config.overrides import ConfigError
from megarch.parallel.context import ParallelContext
from megarch.parallel.data_parallel import any_over
from megarch.parallel.reshard import optimizer_param_names

try:  # CRC32C in C (several GB/s); zlib's CRC32 where the wheel is missing
    import google_crc32c
except ImportError:  # pragma: no cover - the wheel is a dependency
    google_crc32c = None

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"
"""The checkpoint's lineage: ``{"stages": [...], "tokens_by_objective": {...}}``."""
MANIFEST_FILE = "manifest.json"
"""Size and checksum of every other file of the checkpoint: ``{"format": 2, "checksum":
ALGORITHM, "files": {NAME: {"size": BYTES, "checksum": HEX}}}``."""
MANIFEST_FORMAT = 2
"""Checkpoint format of :data:`MANIFEST_FILE` (1: the older pickled files without one)."""
PARAM_NAMES = "param_names"
"""Key of the optimizer file listing each state index's parameter name."""
TEMPORARY_SUFFIX = ".tmp-save"
"""The one temporary directory of a step being written (``step_N.tmp-save``)."""
SUM_SUFFIX = ".sum"
"""A rank's record of one file it wrote (size, checksum), merged into the manifest."""
KILL_IN_SAVE_ENV = "MEGARCH_TEST_KILL_IN_SAVE"
"""Test hook: the step whose save SIGKILLs the writing process halfway through its files."""
MIGRATE_TOOL = "tools/migrate_checkpoint.py"
_EXTENSIONS = {"model": ".safetensors", "optimizer": ".pt", "rng": ".safetensors"}
_LEGACY_FILE = re.compile(r"^(model|rng)(_tp\d+_pp\d+(_dp\d+)?)?\.pt$")
"""The pickled model / RNG files of format 1 checkpoints."""
_CHUNK = 8 << 20
"""Bytes read at a time while checksumming (memory stays flat whatever the file size)."""


DAMAGED = "the checkpoint is damaged; copy it again, or use another checkpoint"
"""The fix every message about a damaged checkpoint ends with."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read as asked (missing, damaged, old format, another
    model); the message names the file and the fix. A :class:`ConfigError`, so every CLI
    reports it as one line."""


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


def shard_file(kind: str, tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """The file name of ``kind`` (model, optimizer, rng) of one (TP rank, stage) of a
    ``tp`` x ``pp`` layout: ``model.safetensors`` at TP1 x PP1, else
    ``model_tp01_pp00.safetensors`` (the optimizer's end in ``.pt``)."""
    if tp == 1 and pp == 1:
        return f"{kind}{_EXTENSIONS[kind]}"
    return f"{kind}_tp{tp_rank:02d}_pp{pp_rank:02d}{_EXTENSIONS[kind]}"


def rng_file(tp_rank: int, pp_rank: int, dp_rank: int, tp: int, pp: int) -> str:
    """The RNG file of one rank: data-parallel rank 0's is :func:`shard_file`'s ``rng`` file,
    the other data-parallel ranks' (whose dropout streams differ) add ``_dpDD``."""
    name = shard_file("rng", tp_rank, pp_rank, tp, pp)
    return name if dp_rank == 0 else (
        f"rng_tp{tp_rank:02d}_pp{pp_rank:02d}_dp{dp_rank:02d}{_EXTENSIONS['rng']}")


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


# ---------------------------------------------------------------- checksums and the manifest

def checksum_algorithm() -> str:
    """The checksum this process writes: ``crc32c`` (google-crc32c), else ``crc32`` (zlib)."""
    return "crc32c" if google_crc32c is not None else "crc32"


def _chunks(file: str) -> Iterator[bytes]:
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def file_checksum(file: str, algorithm: str | None = None) -> str:
    """The checksum (8 hex digits) of ``file``, read in chunks."""
    return bytes_checksum(_chunks(file), algorithm)


def bytes_checksum(chunks, algorithm: str | None = None) -> str:
    """The checksum (8 hex digits) of the bytes of ``chunks`` (an iterable, or one bytes)."""
    if isinstance(chunks, bytes):
        chunks = [chunks]
    algorithm = algorithm or checksum_algorithm()
    if algorithm == "crc32c":
        value = 0
        for chunk in chunks:
            value = google_crc32c.extend(value, chunk)
    elif algorithm == "crc32":
        value = 0
        for chunk in chunks:
            value = zlib.crc32(chunk, value)
    else:
        raise ValueError(f"unknown checksum {algorithm!r}")
    return f"{value:08x}"


def file_entry(file: str) -> dict:
    """The manifest entry of ``file``: its size and checksum."""
    return {"size": os.path.getsize(file), "checksum": file_checksum(file)}


def write_manifest(directory: str, entries: dict[str, dict] | None = None,
                   texts: dict[str, str] | None = None) -> None:
    """Write ``directory``'s :data:`MANIFEST_FILE`: ``entries`` (name: size and checksum,
    already known), every other file in it (checksummed now) and the files ``texts`` is about
    to write (name: content), each as UTF-8."""
    entries = dict(entries or {})
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if (name not in entries and name != MANIFEST_FILE and not name.endswith(SUM_SUFFIX)
                and os.path.isfile(path)):
            entries[name] = file_entry(path)
    for name, text in (texts or {}).items():
        data = text.encode("utf-8")
        entries[name] = {"size": len(data), "checksum": bytes_checksum(data)}
    manifest = {"format": MANIFEST_FORMAT, "checksum": checksum_algorithm(),
                "files": dict(sorted(entries.items()))}
    _write_json(os.path.join(directory, MANIFEST_FILE), json.dumps(manifest, indent=1))


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


def migrate_hint(path: str) -> str:
    """The command converting the older checkpoint ``path``."""
    return f"python {MIGRATE_TOOL} {path}"


def legacy_files(path: str) -> list[str]:
    """The pickled files of an older-format checkpoint ``path`` (none when it has a
    manifest: files it does not list are never read)."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)) or not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if _LEGACY_FILE.match(n))


def check_format(path: str) -> None:
    """Refuse a checkpoint of the older format (pickled model / RNG files, no manifest),
    with the command that converts it."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return
    legacy = legacy_files(path)
    if legacy:
        raise CheckpointError(
            f"{path} is a checkpoint of an older megarch: its pickled {', '.join(legacy)} "
            "could run code when loaded, so they are not read; convert it once with "
            f"`{migrate_hint(path)}`")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"{os.path.join(path, MANIFEST_FILE)} is missing, so {path} "
                              f"cannot be verified: {DAMAGED}")


def read_manifest(path: str) -> dict:
    """Checkpoint ``path``'s validated manifest ``{"checksum": ..., "files": {...}}``."""
    manifest, problem = _load_manifest(path)
    if problem:
        raise CheckpointError(f"{problem}: {DAMAGED}")
    return manifest


def _load_manifest(path: str) -> tuple[dict, str | None]:
    """(manifest, None), or (None, what is wrong with it); an older format raises."""
    check_format(path)
    file = os.path.join(path, MANIFEST_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        return None, f"{file} cannot be read ({err})"
    problem = _manifest_problem(manifest)
    return (None, f"{file}: {problem}") if problem else (manifest, None)


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "not a manifest (no \"files\" object)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return (f"format {manifest.get('format')!r}, this megarch reads format "
                f"{MANIFEST_FORMAT}")
    if manifest.get("checksum") not in ("crc32c", "crc32"):
        return f"unknown checksum {manifest.get('checksum')!r} (crc32c or crc32)"
    for name, entry in manifest["files"].items():
        if (os.path.basename(name) != name or not isinstance(entry, dict)
                or type(entry.get("size")) is not int or entry["size"] < 0
                or not isinstance(entry.get("checksum"), str)):
            return f"bad entry {name!r}: {entry!r}"
    return None


def size_problem(path: str, name: str, entry: dict) -> str | None:
    """What is wrong with the size of file ``name`` of checkpoint ``path`` (None: nothing)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return f"{file} is missing (listed in {MANIFEST_FILE})"
    size = os.path.getsize(file)
    if size != entry["size"]:
        return (f"{file} has {size} bytes, {MANIFEST_FILE} records {entry['size']} "
                f"({'truncated' if size < entry['size'] else 'grown'})")
    return None


def verify_file(path: str, name: str, manifest: dict) -> str | None:
    """What is wrong with file ``name`` of checkpoint ``path`` against its manifest: missing,
    another size, another checksum (None: intact). Reads the file in chunks."""
    entry = manifest["files"].get(name)
    file = os.path.join(path, name)
    if entry is None:
        return f"{file} is not listed in {MANIFEST_FILE}"
    problem = size_problem(path, name, entry)
    if problem:
        return problem
    algorithm = manifest["checksum"]
    if algorithm == "crc32c" and google_crc32c is None:  # pragma: no cover
        log.warning("%s: cannot check its crc32c without google-crc32c (pip install "
                    "google-crc32c); checked its size only", file)
        return None
    actual = file_checksum(file, algorithm)
    if actual != entry["checksum"]:
        return (f"{file} has {algorithm} {actual}, {MANIFEST_FILE} records "
                f"{entry['checksum']} (corrupted)")
    return None


def damage(path: str, part: int = 0, parts: int = 1) -> str | None:
    """What is wrong with checkpoint ``path`` (None: intact): its manifest, then every file's
    size, then the checksums of files ``part::parts`` of the sorted list (so ``parts`` ranks
    check a checkpoint in one read of it together). An older format raises instead."""
    if not os.path.isfile(os.path.join(path, MANIFEST_FILE)) and not legacy_files(path):
        return f"{os.path.join(path, MANIFEST_FILE)} is missing"
    manifest, problem = _load_manifest(path)  # an older format raises
    if problem:
        return problem
    names = sorted(manifest["files"])
    for name in names:
        if problem := size_problem(path, name, manifest["files"][name]):
            return problem
    for name in names[part::parts]:
        if problem := verify_file(path, name, manifest):
            return problem
    return None


# ---------------------------------------------------------------- tensors and RNG states

class TensorFile(Mapping):
    """A safetensors file read by name: each tensor is read (copied from the memory map) only
    when asked for, so a rank holds only the tensors it uses."""

    def __init__(self, file: str):
        self.file = file
        try:
            self._handle = safe_open(file, framework="pt", device="cpu")
            self.metadata = self._handle.metadata() or {}
            self._aliases = json.loads(self.metadata.get("aliases", "{}"))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}): "
                                  f"{DAMAGED}") from None
        self._names = [*self._handle.keys(), *self._aliases]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:
            return self._handle.get_tensor(self._aliases.get(name, name))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.file}: tensor {name} cannot be read ({err}): "
                                  f"{DAMAGED}") from None

    def shape(self, name: str) -> torch.Size:
        """The shape of tensor ``name``, without reading it."""
        return torch.Size(self._handle.get_slice(self._aliases.get(name, name)).get_shape())

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def save_tensors(tensors: dict[str, torch.Tensor], file: str,
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors ``file``; names sharing one tensor (tied weights) are
    stored once (the others as ``aliases`` in the header), partial views copied."""
    out, aliases, seen = {}, {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        storage = key[0]
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
            continue
        if storage in {k[0] for k in seen} and tensor.numel():
            tensor = tensor.clone()
        seen[key] = name
        out[name] = tensor.contiguous()
    meta = dict(metadata or {})
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    save_file(out, file, metadata=meta)


def save_model_file(state: dict[str, torch.Tensor], file: str) -> None:
    """Write a model state dict as safetensors ``file``."""
    save_tensors(state, file, {"format": "megarch-model"})


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


def save_rng_file(state: dict, file: str) -> None:
    """Write an :func:`rng_state` as safetensors ``file``: the generator states and the
    Mersenne-Twister keys as tensors, the rest as JSON in the header (no pickle)."""
    version, python_key, gauss = state["python"]
    name, numpy_key, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"],
               "python": torch.tensor(python_key, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(numpy_key, dtype=np.int64))}
    for index, cuda in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{index}"] = cuda
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_generator": name,
               "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
               "numpy_cached_gaussian": float(cached), "cuda_devices": len(state.get("cuda", []))}
    save_tensors(tensors, file, {"format": "megarch-rng", "scalars": json.dumps(scalars)})


def read_rng_file(file: str) -> dict:
    """The :func:`rng_state` saved in ``file`` by :func:`save_rng_file`, validated."""
    saved = TensorFile(file)
    try:
        scalars = json.loads(saved.metadata["scalars"])
        python = tuple(int(v) for v in saved["python"].tolist())
        numpy_key = saved["numpy"].numpy().astype(np.uint32)
        state = {
            "python": (int(scalars["python_version"]), python,
                       None if scalars["python_gauss"] is None
                       else float(scalars["python_gauss"])),
            "numpy": (str(scalars["numpy_generator"]), numpy_key, int(scalars["numpy_pos"]),
                      int(scalars["numpy_has_gauss"]), float(scalars["numpy_cached_gaussian"])),
            "torch": saved["torch"],
        }
        if scalars["cuda_devices"]:
            state["cuda"] = [saved[f"cuda.{i}"] for i in range(int(scalars["cuda_devices"]))]
        for key in ("torch", *(["cuda"] if "cuda" in state else [])):
            values = state[key] if key == "cuda" else [state[key]]
            if any(v.dtype != torch.uint8 or v.dim() != 1 for v in values):
                raise ValueError(f"{key} is not a 1-D uint8 generator state")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file} is not an RNG state of this format ({err!r}): "
                              f"{DAMAGED}") from None
    return state


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
    def name(kind: str) -> str:
        return os.path.join(directory, shard_file(kind, ctx.tp_rank, ctx.pp_rank, ctx.tp, ctx.pp))

    save_model_file(model.state_dict(), name("model"))
    _record_sum(name("model"))
    _maybe_die_mid_write(step)
    torch.save(optimizer_record(model, optimizer), name("optimizer"))
    _record_sum(name("optimizer"))
    save_rng_file(rng_state(), name("rng"))
    _record_sum(name("rng"))


def _write_json(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


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
    path = step_path(out_dir, state.step)
    # the main rank's view decides for all (a shared filesystem's caches may disagree)
    if any_over(ctx.is_main and os.path.isfile(os.path.join(path, STATE_FILE)),
                ctx.world_group):
        return path
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO-1: gather the shards
        optimizer.consolidate_state_dict(to=0)
    tmp = path + TEMPORARY_SUFFIX
    if ctx.is_main:
        os.makedirs(checkpoint_dir(out_dir), exist_ok=True)
        _remove_stale_temporaries(out_dir)
        os.makedirs(tmp)
    ctx.barrier()
    if ctx.dp_rank == 0:
        write_shard(tmp, model, optimizer, ctx, state.step)
    else:  # its own dropout stream
        file = os.path.join(tmp, rng_file(ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.tp,
                                          ctx.pp))
        save_rng_file(rng_state(), file)
        _record_sum(file)
    ctx.barrier()  # every shard is on disk (a rank that died raises here on the others)
    if ctx.is_main:
        texts = {CONFIG_FILE: config_json}
        if lineage is not None:
            texts[LINEAGE_FILE] = json.dumps(lineage, indent=2)
        texts[STATE_FILE] = json.dumps(asdict(state), indent=2)
        write_manifest(tmp, _collect_sums(tmp), texts)
        # state.json last: its presence marks the directory complete (besides the rename)
        for name, text in texts.items():
            _write_json(os.path.join(tmp, name), text)
        os.rename(tmp, path)
        log.info("saved checkpoint %s", path)
        if keep_last:  # the older ones only: never this step, nor a newer one
            older = [p for step, p in list_checkpoints(out_dir) if step < state.step]
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                _remove_checkpoint(old)
    ctx.barrier()
    return path


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


def load_model(path: str, device: torch.device | str = "cpu"):
    """``(model, config)`` of checkpoint ``path`` of any layout: the single-process model its
    ``config.json`` describes (``parallel.tp = pp = 1`` in the returned config), with its
    weights, in eval mode (for evaluation and conversion; no optimizer, no RNG)."""
    from megarch.model import build_model
    from megarch.training.resume import SavedCheckpoint

    saved = SavedCheckpoint(path)
    cfg = saved.config()
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.sequence_parallel = False
    model = build_model(cfg.model, device)
    model.load_state_dict(saved.model_state(list(model.state_dict()), 0, 1))
    return model.eval(), cfg


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    ctx: ParallelContext | None = None,
) -> TrainState:
    """Load checkpoint ``path`` (any TP/PP layout) into ``model`` (this rank's shard or stage
    under ``ctx``; default a single process), ``optimizer`` and the RNGs; return its
    :class:`TrainState`. See :func:`megarch.training.resume.load_into`."""
    from megarch.training.resume import load_into

    return load_into(path, model, optimizer, ctx or ParallelContext.single(), restore_rng)
