#!/usr/bin/env python3
"""Convert checkpoints of older megarch versions (pickled files, no manifest) to today's format.

    python tools/migrate_checkpoint.py runs/cd_flm/checkpoints/step_00001000
    python tools/migrate_checkpoint.py runs/cd_flm            # every checkpoint of a run

Older checkpoints held ``model*.pt`` and ``rng*.pt`` (``torch.save`` pickles; the RNG files held
NumPy arrays, which only a full unpickler reads, and a full unpickler runs whatever code a file
names) and no manifest. Today's loaders refuse them (megarch.training.checkpoint). This tool
converts one in place, never with a full unpickler:

- ``model*.pt`` -> ``model*.safetensors`` (read with ``torch.load(weights_only=True)``: tensors
  and plain containers only);
- ``rng*.pt`` -> ``rng*.safetensors``: read by torch's same restricted unpickler, with the three
  NumPy names an RNG state needs (the array reconstructor, ``ndarray``, ``dtype``) allowed and
  nothing else; the result must have exactly the shape of an RNG state (checked) before it is
  written;
- ``optimizer*.pt`` stays (it must load with ``weights_only=True``, checked);
- ``state.json`` is validated, then ``manifest.json`` records every file's size and checksum.

A file holding anything else (e.g. a pickle that would call a function) is refused, naming it,
and the checkpoint is left as it was. Each step is atomic and the pickled files are removed
only once their conversions are on disk, so an interrupted migration is finished by running
the command again. Why our own code: the conversion is specific to megarch's file layout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
import torch

from megarch.atomic import atomic_file
from megarch.training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    list_checkpoints,
    read_state,
)
from megarch.training.checkpoint_files import (
    MANIFEST_FILE,
    legacy_files,
    save_model_file,
    save_rng_file,
    write_manifest,
)

_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
"""NumPy's array reconstructor (``numpy._core.multiarray._reconstruct`` on NumPy 2)."""
_NUMPY_NAMES = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
"""The names pickles of NumPy 1 and 2 give the reconstructor."""


def _tensors_only(file: str):
    """``file`` loaded by torch's restricted unpickler (tensors and plain containers)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{file} holds more than tensors ({reason}): refused, nothing "
                              "in it was run; the checkpoint is left as it was") from None


def _allowed_numpy() -> list:
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:  # torch >= 2.6 maps a pickle's name to an allowed object
        with torch.serialization.safe_globals([(_NUMPY_RECONSTRUCT, n) for n in _NUMPY_NAMES]):
            pass
        return [*allowed, *((_NUMPY_RECONSTRUCT, n) for n in _NUMPY_NAMES)]
    except (TypeError, AttributeError):
        return [*allowed, _NUMPY_RECONSTRUCT]


def read_legacy_rng(file: str) -> dict:
    """The RNG state of an older ``rng*.pt``, read without a full unpickler and checked."""
    try:
        with torch.serialization.safe_globals(_allowed_numpy()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{file} is not a plain RNG state ({reason}): refused, nothing "
                              "in it was run; the checkpoint is left as it was") from None
    problem = _rng_problem(state)
    if problem:
        raise CheckpointError(f"{file} is not an RNG state ({problem}): refused; the "
                              "checkpoint is left as it was")
    return state


def _rng_problem(state) -> str | None:
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        return "not a dict with python, numpy and torch states"
    python, numpy_state = state["python"], state["numpy"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)
            and all(type(v) is int for v in python[1])):
        return "python: not random.getstate()'s (version, ints, gauss)"
    if not (isinstance(numpy_state, tuple) and len(numpy_state) == 5
            and isinstance(numpy_state[1], np.ndarray) and numpy_state[1].dtype == np.uint32):
        return "numpy: not np.random.get_state()'s tuple with a uint32 key"
    tensors = [state["torch"], *state.get("cuda", [])]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in tensors):
        return "torch / cuda: not uint8 generator states"
    return None


def _replace(file: str, write) -> None:
    """Write ``file`` through ``write(tmp)`` atomically."""
    with atomic_file(file) as tmp:
        write(tmp)


def needs_migration(path: str) -> bool:
    """True for a checkpoint directory of the older format (no manifest)."""
    return (os.path.isfile(os.path.join(path, STATE_FILE))
            and not os.path.isfile(os.path.join(path, MANIFEST_FILE)))


def migrate(path: str) -> list[str]:
    """Convert checkpoint ``path`` in place; return the files written (none: nothing to do)."""
    if not needs_migration(path):
        return []
    read_state(path)  # a damaged state.json is refused before anything changes
    legacy = legacy_files(path)
    converted = {}
    for name in legacy:  # read everything first: one refusal leaves the checkpoint untouched
        file = os.path.join(path, name)
        converted[name] = (_tensors_only(file) if name.startswith("model")
                           else read_legacy_rng(file))
    for name in sorted(os.listdir(path)):
        if name.startswith("optimizer") and name.endswith(".pt"):
            _tensors_only(os.path.join(path, name))
    written = []
    for name, value in converted.items():
        target = os.path.join(path, name[: -len(".pt")] + ".safetensors")
        if name.startswith("model"):
            _replace(target, lambda tmp, v=value: save_model_file(v, tmp))
        else:
            _replace(target, lambda tmp, v=value: save_rng_file(v, tmp))
        written.append(target)
    for name in legacy:  # converted and on disk: the pickles go
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))
    write_manifest(path)
    written.append(os.path.join(path, MANIFEST_FILE))
    return written


def checkpoints_of(path: str) -> list[str]:
    """``path`` itself when it is a checkpoint, else its run's checkpoints."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return [path]
    found = [p for _, p in list_checkpoints(path)]
    if not found:
        raise CheckpointError(f"{path} is neither a checkpoint (a directory holding "
                              f"{STATE_FILE}) nor a run directory with checkpoints; pass one")
    return found


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a checkpoint directory, or a run's out_dir (all of them)")
    args = parser.parse_args(argv)
    try:
        for path in checkpoints_of(args.path):
            written = migrate(path)
            print(f"{path}: {'converted' if written else 'already in the current format'}")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
