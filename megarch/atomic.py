"""Publish files and directories only once they are complete.

Everything megarch writes that a later run reads (datasets, index caches, checkpoints) goes
through these helpers: the data is written under a temporary name beside the destination and
renamed into place when complete, so a crash never leaves a half-written output that looks whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


def temporary_name(path: str) -> str:
    """A unique temporary name beside ``path`` (same filesystem, so the rename is atomic)."""
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success rename it to ``path``, on error remove it."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory to fill; on success rename it to ``path``.

    If ``path`` appeared meanwhile (another process published the same deterministic content),
    the temporary copy is discarded and the existing directory is kept.
    """
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
