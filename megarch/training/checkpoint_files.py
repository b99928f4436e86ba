"""The files of one checkpoint directory: their names, their formats, and their verification.

- Tensors are safetensors (:func:`save_tensors`, :class:`TensorFile`): a header and raw bytes,
  read tensor by tensor from a memory map, with nothing in the file that a reader executes.
  The model's state dict is one such file per (TP rank, stage); the RNG states are another
  (:func:`save_rng_file`): the torch generator states as uint8 tensors, Python's and NumPy's
  Mersenne-Twister keys as int64 tensors, their few scalars as JSON in the header.
- ``manifest.json`` (:func:`write_manifest`) records the size and checksum of every other file:
  CRC32C through google-crc32c (several GB/s in C), else zlib's CRC32, the algorithm named in
  the manifest. :func:`verify_file` checks one file, streaming it in chunks (memory stays flat);
  :func:`damage` a whole checkpoint, optionally split over ranks.
- A checkpoint of the older format (pickled ``model*.pt`` / ``rng*.pt``, no manifest) is
  refused by :func:`check_format` with the command converting it (``tools/migrate_checkpoint.py``).

The RNG and manifest formats are our own small schemas on top of safetensors and JSON: no
library records a checkpoint's per-file checksums or Python's and NumPy's RNG states without
pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megarch.config.overrides import ConfigError

try:  # CRC32C in C (several GB/s); zlib's CRC32 where the wheel is missing
    import google_crc32c
except ImportError:  # pragma: no cover - the wheel is a dependency
    google_crc32c = None

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"
"""The checkpoint's lineage: ``{"stages": [...], "tokens_by_objective": {...}}``."""
MANIFEST_FILE = "manifest.json"
"""Size and checksum of every other file of the checkpoint: ``{"format": 2, "checksum":
ALGORITHM, "files": {NAME: {"size": BYTES, "checksum": HEX}}}``."""
MANIFEST_FORMAT = 2
"""Checkpoint format of :data:`MANIFEST_FILE` (1: the older pickled files without one)."""
SUM_SUFFIX = ".sum"
"""A rank's record of one file it wrote (size, checksum), merged into the manifest."""
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
    to write (name: content), each as UTF-8. Temporary files (``*.tmp-*``, left by a killed
    write) are not listed."""
    entries = dict(entries or {})
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if (name not in entries and name != MANIFEST_FILE and not name.endswith(SUM_SUFFIX)
                and ".tmp-" not in name and os.path.isfile(path)):
            entries[name] = file_entry(path)
    for name, text in (texts or {}).items():
        data = text.encode("utf-8")
        entries[name] = {"size": len(data), "checksum": bytes_checksum(data)}
    manifest = {"format": MANIFEST_FORMAT, "checksum": checksum_algorithm(),
                "files": dict(sorted(entries.items()))}
    with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1))



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
