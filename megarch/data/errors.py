"""The one error type for bad data input, and the output-directory check every writer shares.

Its message names the file (and line or field) and says the fix.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data or a corrupt dataset file; the message says where and what to do."""


def make_output_dir(directory: str, option: str = "--output") -> str:
    """Create ``directory`` and its parents (as ``mkdir -p``) for an output named by ``option``.

    An output beside a missing directory is created, as the README's commands expect
    (``--output data/p3/tokenized/x``); a directory that cannot be created or written (a parent
    that is a file, no permission, a read-only filesystem) is a :class:`DataError` naming it.
    """
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        blocker = _existing_ancestor(directory)
        if not os.path.isdir(blocker):
            raise DataError(
                f"{option}: cannot create directory {directory}: {blocker} is a file, not a "
                "directory; give an output path in a directory you can write"
            ) from None
        raise DataError(
            f"{option}: cannot create directory {directory} ({err.strerror}: {err.filename}); "
            "give an output path in a directory you can write"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(
            f"{option}: directory {directory} is not writable; give an output path in a "
            "directory you can write"
        )
    return directory


def check_output_dir(directory: str, option: str) -> None:
    """Raise the :class:`DataError` :func:`make_output_dir` would, without creating anything:
    for a command that creates ``directory`` later and must fail early, leaving nothing."""
    directory = os.path.abspath(directory)
    blocker = _existing_ancestor(directory)
    if not os.path.isdir(blocker):
        raise DataError(
            f"{option}: cannot create directory {directory}: {blocker} is a file, not a "
            "directory; give an output path in a directory you can write"
        )
    if not os.access(blocker, os.W_OK | os.X_OK):
        raise DataError(f"{option}: directory {blocker} is not writable; give an output path "
                        "in a directory you can write")


def _existing_ancestor(path: str) -> str:
    """The longest prefix of ``path`` that exists (at worst the filesystem root)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
