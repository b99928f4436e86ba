"""The embedded default corpus: English prose that exists offline on every machine.

Every Python installation ships its standard library as source, and that source carries a few
thousand hand-written docstrings: real English, mixed with some code, much like the technical
pages of a web crawl. :func:`build_stdlib_corpus` collects them into a jsonl file (one
``{"text": ..., "source": ...}`` object per line) that the tokenizer trainer, the dataset builder
and the tests can use without any download.

How the text is gathered (deterministic for a given Python build):

* Source files under ``sysconfig.get_paths()["stdlib"]`` are read in sorted order of their
  relative paths and parsed with :mod:`ast`; nothing is imported or executed.
* Skipped: test packages (any directory called ``test`` or ``tests``) and packages that are
  not library prose (``idlelib``, ``lib2to3``, ``tkinter``, ``turtledemo``), third-party code
  (``site-packages``, ``dist-packages``), and files that do not parse.
* Docstrings of the module and of every class and function (nested ones too) are taken in
  source order, cleaned with :func:`inspect.cleandoc` and stripped.
* The Python reference manual's topic texts in ``pydoc_data/topics.py`` (the text ``help()``
  shows, a string table, not docstrings) are included too: ~0.5 MB of good prose.
* Filter: a text is kept when it has at least ``min_chars`` characters and at least
  :data:`MIN_PROSE_FRACTION` of its characters are letters or spaces; this drops tables, byte
  dumps and docstrings that are mostly doctest output. Exact duplicates are kept once (the first
  in file order).
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import sysconfig
from collections.abc import Iterator

from megarch.atomic import atomic_file
from megarch.data.errors import DataError, make_output_dir

log = logging.getLogger(__name__)

SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "__pycache__",
    }
)
"""Directory names never entered (at any depth) when collecting docstrings."""

MIN_PROSE_FRACTION = 0.7
"""A kept text has at least this fraction of letters and spaces among its characters."""

PYDOC_TOPICS = "pydoc_data/topics.py"
"""The stdlib file holding the reference manual's topic texts (a dict of strings)."""

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> str:
    """The directory of the running interpreter's standard-library sources."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_source_files(root: str) -> list[str]:
    """Relative paths (``/``-separated, sorted) of the ``.py`` files to read under ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("config-")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def module_name(rel_path: str) -> str:
    """Dotted module name of a relative source path: ``json/__init__.py`` -> ``json``."""
    parts = rel_path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_prose(text: str, min_chars: int) -> bool:
    """Whether ``text`` is long enough and mostly letters and spaces (see the module doc)."""
    if len(text) < min_chars:
        return False
    letters = sum(1 for c in text if c.isalpha() or c == " ")
    return letters >= MIN_PROSE_FRACTION * len(text)


def _docstrings(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
    """(qualname, cleaned docstring) of ``node`` and every class/function inside it, in order."""
    if isinstance(node, _DOCUMENTED):
        raw = ast.get_docstring(node, clean=False)
        if raw:
            yield qualname, inspect.cleandoc(raw).strip()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{qualname}.{child.name}")
        elif not isinstance(child, _DOCUMENTED):
            # Definitions nested in if/try/with blocks still belong to this scope.
            yield from _docstrings(child, qualname)


def _pydoc_topics(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(topic, text) pairs from the ``topics = {...}`` literal of ``pydoc_data/topics.py``."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Dict):
            for key, value in zip(stmt.value.keys, stmt.value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    if isinstance(value.value, str):
                        yield f"[{key.value}]", inspect.cleandoc(value.value).strip()


def file_texts(root: str, rel_path: str) -> Iterator[tuple[str, str]]:
    """(source, text) pairs of one stdlib file; a file that does not parse yields nothing."""
    path = os.path.join(root, rel_path)
    with open(path, "rb") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError) as e:
        log.warning("skipping %s: it does not parse (%s)", path, e)
        return
    name = module_name(rel_path)
    if rel_path == PYDOC_TOPICS:
        for topic, text in _pydoc_topics(tree):
            yield f"{name}{topic}", text
        return
    for qualname, text in _docstrings(tree, name):
        yield qualname, text


def build_stdlib_corpus(
    output_path: str,
    min_chars: int = 200,
    max_docs: int | None = None,
    progress: bool = True,
    root: str | None = None,
) -> dict[str, int]:
    """Write the stdlib-docstring corpus to ``output_path`` (jsonl, written atomically).

    Args:
        output_path: the jsonl file to write; each line is ``{"text": ..., "source": ...}``
            where ``source`` is ``module.qualname`` (or ``pydoc_data.topics[topic]``).
        min_chars: shortest text kept, in characters.
        max_docs: stop after this many documents (the first ones in file order).
        progress: show a tqdm bar over the source files.
        root: the standard-library directory to read; default :func:`stdlib_dir`.

    Returns:
        ``{"docs": ..., "chars": ..., "files": ...}``: documents and characters written and the
        number of source files read.
    """
    from tqdm import tqdm

    root = root or stdlib_dir()
    if not os.path.isdir(root):
        raise DataError(f"standard-library directory {root} does not exist; pass an existing one")
    rel_paths = stdlib_source_files(root)
    seen: set[str] = set()
    docs = chars = files = 0
    out_dir = os.path.dirname(os.path.abspath(output_path))
    make_output_dir(out_dir, "--output")
    with atomic_file(output_path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        bar = tqdm(rel_paths, desc="stdlib docstrings", unit="file", disable=not progress)
        for rel_path in bar:
            if max_docs is not None and docs >= max_docs:
                break
            files += 1
            for source, text in file_texts(root, rel_path):
                if text in seen or not is_prose(text, min_chars):
                    continue
                seen.add(text)
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False))
                out.write("\n")
                docs += 1
                chars += len(text)
                if max_docs is not None and docs >= max_docs:
                    break
        if docs == 0:  # raised inside the block, so no empty file is published
            raise DataError(
                f"no documents of >= {min_chars} characters found in the Python sources under "
                f"{root}; pass the standard-library directory as root, or a smaller min_chars"
            )
    log.info(
        "wrote %s: %d docs, %d chars from %d files of %s", output_path, docs, chars, files, root
    )
    return {"docs": docs, "chars": chars, "files": files}
