"""Tokenize jsonl / jsonl.gz files into indexed datasets, one per json key, in parallel.

Output naming follows Megatron's ``preprocess_data.py``: key ``k`` goes to
``{output_prefix}_{k}_document.{bin,idx}``. With several keys (``inputs`` and ``targets`` for
prompted data) the datasets are aligned: document ``i`` of every key comes from the same line,
because a line is kept or skipped as a whole.

Work is split into chunks of about ``chunk_size`` bytes. A worker reads the lines that start in
its byte range of a plain file itself (gzip input is decompressed by the main process, which
sends the lines), decodes, parses and tokenizes them, checks the ids against the output dtype,
and sends back one flat token array and one length array per key. The main process only plans
chunks, writes results in chunk order and keeps the counts, so the output is the same for any
number of workers. Nothing is published until every key's dataset is complete.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from megarch.data.errors import DataError, make_output_dir
from megarch.data.indexed_dataset import (
    IndexedDatasetWriter,
    best_dtype,
    dtype_code,
    token_overflow_error,
)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 18
"""Bytes of input per unit of work: small enough that the last chunks of a short run keep every
worker busy, big enough that the per-chunk overhead is a rounding error."""

MAX_EXAMPLES = 5
"""How many file:line locations of skipped bad lines the summary keeps."""

# reason -> (what it is, in the summary; how to fix it, in the error). Blank lines and empty text
# are skipped silently (counted, never an error); the others are bad lines.
SKIP_REASONS: dict[str, tuple[str, str]] = {
    "blank_line": ("blank line", ""),
    "empty": ("empty text", ""),
    "invalid_utf8": ("invalid UTF-8", "re-encode the file as UTF-8"),
    "malformed_json": ("malformed JSON", "fix the line"),
    "not_object": ("not a JSON object", 'each line must be one JSON object like {"text": "..."}'),
    "missing_key": ("missing key", "choose the fields to read with --json-keys"),
    "not_string": ("non-string value", "the field must hold a string"),
    "unencodable": ("text the tokenizer cannot encode", "fix or remove the text"),
    "empty_file": ("empty file", "remove the file from the inputs"),
}
_BOM = b"\xef\xbb\xbf"
_NOT_BAD = ("blank_line", "empty")
_SKIP_HINT = "or pass --skip-bad-lines (skip_bad_lines=True) to skip such lines"


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Where key ``key`` is written: ``{output_prefix}_{key}_document`` (Megatron's naming)."""
    return f"{output_prefix}_{key}_document"


@dataclass
class PreprocessSummary:
    """What a preprocessing run read, wrote and skipped."""

    files: list[str]
    """Input files, in the order they were read."""
    outputs: dict[str, str]
    """Dataset path prefix written for each json key."""
    dtype: str
    """Token dtype of the datasets."""
    lines: int = 0
    """Lines read (kept and skipped)."""
    docs: int = 0
    """Documents written (the same for every key)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Tokens written per key (end-of-document tokens included)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped lines (or files) by reason, a key of ``SKIP_REASONS``."""
    skipped_examples: list[str] = field(default_factory=list)
    """The first few ``file:line (reason)`` locations of skipped bad lines."""
    seconds: float = 0.0
    """Wall-clock time of the run."""

    def format(self) -> str:
        """A human-readable multi-line summary."""
        secs = max(self.seconds, 1e-9)
        total_tokens = sum(self.tokens.values())
        lines = [
            f"preprocessed {len(self.files)} file(s), {self.lines:,} lines -> {self.docs:,} "
            f"documents in {self.seconds:.1f} s ({self.docs / secs:,.0f} docs/s, "
            f"{total_tokens / secs:,.0f} tokens/s)"
        ]
        for key, prefix in self.outputs.items():
            tokens = self.tokens.get(key, 0)
            lines.append(f"  {key}: {tokens:,} tokens -> {prefix}.{{bin,idx}} ({self.dtype})")
        if self.skipped:
            parts = ", ".join(
                f"{n:,} {SKIP_REASONS[r][0]}" for r, n in sorted(self.skipped.items())
            )
            lines.append(f"  skipped {sum(self.skipped.values()):,}: {parts}")
            if self.skipped_examples:
                lines.append("  first bad lines: " + ", ".join(self.skipped_examples))
        return "\n".join(lines)


def resolve_inputs(inputs: Sequence[str] | str) -> list[str]:
    """Expand globs into files (sorted per pattern, duplicates dropped); DataError if none."""
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern; check the path")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern}: is a directory; pass its files or a glob like dir/*.jsonl")
        elif not os.path.isfile(pattern):
            raise DataError(f"{pattern}: file not found; check the path")
        else:
            files.append(pattern)
    if not files:
        raise DataError("no input files given; pass jsonl or jsonl.gz files or globs")
    for path in files:
        try:
            open(path, "rb").close()
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror}); check its permissions") from e
    unique = list(dict.fromkeys(files))
    if len(unique) < len(files):
        logger.warning(
            "%d input file(s) were named twice; each is read once", len(files) - len(unique)
        )
    return unique


class _Task(NamedTuple):
    """One unit of work: the lines of ``path`` that start in bytes ``[start, end)``, or lines
    already read (gzip input), or a problem with the file met while planning or reading it."""

    file_index: int
    path: str
    start: int = 0
    end: int = 0
    data: bytes | None = None  # the lines themselves (gzip: start/end are decompressed offsets)
    problem: str | None = None  # "empty_file" or a DataError message


def _plan_tasks(files: list[str], chunk_size: int) -> Iterator[_Task]:
    """Every file's chunks, in order: byte ranges of plain files, decompressed lines of gzip."""
    for index, path in enumerate(files):
        if path.endswith(".gz"):
            yield from _gzip_tasks(index, path, chunk_size)
            continue
        size = os.path.getsize(path)
        if size == 0:
            yield _Task(index, path, problem="empty_file")
        for start in range(0, size, chunk_size):
            yield _Task(index, path, start, min(start + chunk_size, size))


def _gzip_tasks(index: int, path: str, chunk_size: int) -> Iterator[_Task]:
    """Chunks of whole lines of a gzip file; a corrupt stream ends them with a problem."""
    offset = 0  # in the decompressed stream
    try:
        with gzip.open(path, "rb") as stream:
            carry = b""
            while block := stream.read(chunk_size):
                data = carry + block
                cut = data.rfind(b"\n") + 1
                chunk, carry = data[:cut], data[cut:]  # a line longer than a chunk: read on
                if chunk:
                    yield _Task(index, path, offset, offset + cut, data=chunk)
                    offset += cut
            if carry:
                yield _Task(index, path, offset, offset + len(carry), data=carry)
                offset += len(carry)
    except (OSError, EOFError, zlib.error) as e:
        message = f"{path}: a corrupt or truncated gzip file ({e}); re-create or re-download it"
        yield _Task(index, path, problem=message)
        return
    if offset == 0:
        yield _Task(index, path, problem="empty_file")


def _read_lines(task: _Task) -> bytes:
    """The task's lines: those starting in its byte range (the last one read to its end)."""
    if task.data is not None:
        data = task.data
    else:
        with open(task.path, "rb") as f:
            if task.start > 0:
                f.seek(task.start - 1)
                f.readline()  # to the first line that starts at or after `start`
            begin = f.tell()
            if begin >= task.end:
                return b""  # the range lies inside one long line
            data = f.read(task.end - begin)
            if not data.endswith(b"\n"):
                data += f.readline()
    if task.start == 0 and data.startswith(_BOM):
        data = data[len(_BOM) :]  # a UTF-8 byte-order mark (first chunk of a file only)
    return data


class _ChunkResult(NamedTuple):
    """What a worker sends back: compact arrays, line numbers relative to the chunk (1-based)."""

    num_lines: int
    line_numbers: np.ndarray  # int64 [docs]: line of each kept document
    flat: list[np.ndarray]  # per key, in the output dtype: every token of the chunk's documents
    lengths: list[np.ndarray]  # per key: int64 [docs] tokens per document
    skipped: dict[str, int]
    bad_lines: list[tuple[int, str, str]]  # (line, reason, detail), the first few
    overflow: tuple[int, str, int] | None = None  # (line, key, id) of an id the dtype can't hold


class _ChunkTokenizer:
    """Read, decode, parse and tokenize one chunk (runs in a worker or in-process)."""

    def __init__(
        self,
        tokenizer: Any,
        json_keys: tuple[str, ...],
        append_eos: bool,
        skip_bad_lines: bool,
        dtype: np.dtype,
    ) -> None:
        self.tokenizer = tokenizer
        self.json_keys = json_keys
        self.eos = tokenizer.eos_id if append_eos else None
        self.skip_bad_lines = skip_bad_lines
        self.dtype = dtype
        self.id_dtype = np.int32 if tokenizer.vocab_size <= 2**31 else np.int64

    def __call__(self, task: _Task) -> _ChunkResult:
        lines = _split_lines(_read_lines(task))
        texts, kept, skipped, bad = self._parse_lines(lines)
        if bad and not self.skip_bad_lines:  # the run stops at this line: skip the tokenizing
            no_docs = np.zeros(0, np.int64)
            empty = [np.zeros(0, self.dtype)] * len(texts)
            return _ChunkResult(len(lines), no_docs, empty, [no_docs] * len(texts), skipped, bad)
        kept, ids_per_key, dropped = self._encode(texts, kept)
        for number, detail in dropped:
            skipped["unencodable"] = skipped.get("unencodable", 0) + 1
            bad.append((number, "unencodable", detail))
        line_numbers = np.array(kept, dtype=np.int64)
        flat, lengths, overflow = [], [], None
        for key, ids in zip(self.json_keys, ids_per_key, strict=True):
            tokens, doc_lengths = _flatten(ids, self.eos, self.id_dtype)
            overflow = overflow or _first_overflow(
                tokens, doc_lengths, line_numbers, key, self.dtype
            )
            flat.append(tokens.astype(self.dtype))
            lengths.append(doc_lengths)
        bad = sorted(bad)[:MAX_EXAMPLES]
        return _ChunkResult(len(lines), line_numbers, flat, lengths, skipped, bad, overflow)

    def _parse_lines(
        self, lines: list[str | UnicodeDecodeError]
    ) -> tuple[list[list[str]], list[int], dict[str, int], list[tuple[int, str, str]]]:
        """Texts per key and line numbers of the kept lines; skip counts; the first bad lines."""
        texts: list[list[str]] = [[] for _ in self.json_keys]
        kept: list[int] = []
        skipped: dict[str, int] = {}
        bad: list[tuple[int, str, str]] = []
        for number, line in enumerate(lines, 1):
            values, reason, detail = self._parse(line)
            if reason is None:
                kept.append(number)
                for column, value in zip(texts, values, strict=True):
                    column.append(value)
                continue
            skipped[reason] = skipped.get(reason, 0) + 1
            if reason not in _NOT_BAD:
                if len(bad) < MAX_EXAMPLES:
                    bad.append((number, reason, detail))
                if not self.skip_bad_lines:
                    break
        return texts, kept, skipped, bad

    def _parse(self, line: str | UnicodeDecodeError) -> tuple[list[str], str | None, str]:
        """The line's texts, or the reason it is skipped and a description."""
        if isinstance(line, UnicodeDecodeError):
            byte = line.object[line.start : line.start + 1].hex()
            return [], "invalid_utf8", f"not valid UTF-8 (byte 0x{byte} at byte {line.start})"
        if not line or line.isspace():
            return [], "blank_line", ""
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
            return [], "malformed_json", f"not valid JSON ({msg})"
        if not isinstance(obj, dict):
            return [], "not_object", f"a JSON {_json_type(obj)}, not an object"
        values = []
        for key in self.json_keys:
            if key not in obj:
                fields = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                return [], "missing_key", f"no field {key!r} (fields: {fields})"
            value = obj[key]
            if not isinstance(value, str):
                detail = f"field {key!r} is a JSON {_json_type(value)}, not a string"
                return [], "not_string", detail
            values.append(value)
        if any(not v or v.isspace() for v in values):
            return [], "empty", ""
        return values, None, ""

    def _encode(
        self, texts: list[list[str]], kept: list[int]
    ) -> tuple[list[int], list[list[list[int]]], list[tuple[int, str]]]:
        """Token ids per key; lines the tokenizer rejects are dropped from every key.

        Texts are encoded one by one, not with ``encode_batch``: the SentencePiece and HF batch
        calls spread over every core, which would oversubscribe the worker processes; one call
        per text is as fast as a single-threaded batch.
        """
        encode = self.tokenizer.encode
        ids_per_key: list[list[list[int]]] = []
        dropped: dict[int, str] = {}
        for column in texts:
            ids: list[list[int]] = []
            for number, text in zip(kept, column, strict=True):
                try:
                    ids.append(encode(text))
                except Exception as e:  # e.g. a lone surrogate, which SentencePiece rejects
                    ids.append([])
                    dropped.setdefault(number, f"the tokenizer failed on it ({e!r:.200})")
            ids_per_key.append(ids)
        if dropped:
            keep = [i for i, number in enumerate(kept) if number not in dropped]
            kept = [kept[i] for i in keep]
            ids_per_key = [[ids[i] for i in keep] for ids in ids_per_key]
        return kept, ids_per_key, sorted(dropped.items())


def _split_lines(data: bytes) -> list[str | UnicodeDecodeError]:
    """The lines of ``data``; a line that is not UTF-8 becomes its decode error."""
    try:
        lines: list = data.decode("utf-8").split("\n")  # no UTF-8 sequence contains "\n"
    except UnicodeDecodeError:
        lines = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                lines.append(e)
    if lines[-1] == "":
        lines.pop()  # what follows the last newline
    return lines


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _flatten(ids: list[list[int]], eos: int | None, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """One flat token array and the per-document lengths, with ``eos`` after each document."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    if eos is not None:
        flat = np.insert(flat, np.cumsum(lengths), dtype(eos))
        lengths += 1
    return flat, lengths


def _first_overflow(
    flat: np.ndarray, lengths: np.ndarray, line_numbers: np.ndarray, key: str, dtype: np.dtype
) -> tuple[int, str, int] | None:
    """(line, key, id) of the first token id that ``dtype`` cannot hold, or None."""
    if flat.size == 0 or np.can_cast(flat.dtype, dtype):
        return None
    info = np.iinfo(dtype)
    if flat.min() >= info.min and flat.max() <= info.max:
        return None
    first = int(np.flatnonzero((flat < info.min) | (flat > info.max))[0])
    doc = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
    return int(line_numbers[doc]), key, int(flat[first])


# One per worker process, set by the pool initializer. The tokenizer arrives pickled, which
# rebuilds it from its spec (a spawned worker loads the file once; a forked one has a copy).
_worker: _ChunkTokenizer | None = None


def _init_worker(*args: Any) -> None:
    global _worker
    _worker = _ChunkTokenizer(*args)


def _work(task: _Task) -> _ChunkResult:
    assert _worker is not None, "the pool initializer did not run"
    return _worker(task)


def preprocess(
    inputs: Sequence[str] | str,
    output_prefix: str,
    tokenizer_spec: str,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eos: bool = True,
    skip_bad_lines: bool = False,
    dtype: np.dtype | type | str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize jsonl / jsonl.gz ``inputs`` into one indexed dataset per key of ``json_keys``.

    Args:
        inputs: files or glob patterns, read in the order given (each glob sorted).
        output_prefix: key ``k`` is written to ``{output_prefix}_{k}_document.{bin,idx}``.
        tokenizer_spec: ``"bytes"``, a SentencePiece ``.model`` or a HF ``tokenizer.json``.
        json_keys: fields to tokenize; their datasets are aligned line by line.
        workers: processes that parse and tokenize; 1 runs in this process. The output is the
            same for any number.
        append_eos: end every document with the tokenizer's end-of-sequence id.
        skip_bad_lines: skip (and count) bad lines instead of stopping at the first one.
        dtype: token dtype; by default uint16 when the vocabulary fits, else int32.
        chunk_size: bytes of input per unit of work.
        progress: show a progress bar on stderr.

    Raises:
        DataError: bad input (naming the file and line and the fix). Nothing is published then.
    """
    started = time.perf_counter()
    files = resolve_inputs(inputs)
    keys = tuple(json_keys)
    if not keys or len(set(keys)) < len(keys):
        raise DataError(f"--json-keys {' '.join(json_keys)}: give distinct, non-empty keys")
    if workers < 1 or chunk_size < 1:
        raise DataError(f"--workers {workers} (chunk size {chunk_size}): must be >= 1")
    from megarch.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = best_dtype(tokenizer.vocab_size) if dtype is None else np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"dtype must be an integer type for token ids, got {dtype}")
    dtype_code(dtype)
    outputs = {key: output_prefix_for_key(output_prefix, key) for key in keys}
    make_output_dir(os.path.dirname(os.path.abspath(output_prefix)), "--output")
    summary = PreprocessSummary(files, outputs, str(dtype), tokens=dict.fromkeys(keys, 0))
    writers: dict[str, IndexedDatasetWriter] = {}
    try:
        for key, prefix in outputs.items():
            writers[key] = IndexedDatasetWriter(prefix, dtype)
        collector = _Collector(files, writers, summary, skip_bad_lines)
        chunk_args = (tokenizer, keys, append_eos, skip_bad_lines, dtype)
        _run(_plan_tasks(files, chunk_size), collector, chunk_args, workers, progress)
        if summary.docs == 0:
            raise DataError(
                f"no documents in {', '.join(files)}: every line was skipped "
                f"({_format_counts(summary.skipped)}); check the inputs and --json-keys"
            )
        for writer in writers.values():
            writer.finalize(publish=False)
        for writer in writers.values():  # every key is complete: publish them together
            writer.publish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    summary.seconds = time.perf_counter() - started
    logger.debug("%s", summary.format())
    return summary


def _run(
    tasks: Iterator[_Task], collector: _Collector, chunk_args: tuple, workers: int, progress: bool
) -> None:
    """Process every task in order, in this process or a pool, feeding the collector."""
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(_worker_pool(workers, chunk_args))
            results = _ordered_results(pool, tasks, window=2 * workers + 1)
        else:
            local = _ChunkTokenizer(*chunk_args)
            results = ((task, None if task.problem else local(task)) for task in tasks)
        bar = stack.enter_context(
            tqdm(
                desc="preprocess",
                unit="doc",
                unit_scale=True,
                file=sys.stderr,
                disable=not progress,
            )
        )
        started = time.perf_counter()
        for task, result in results:
            docs = collector.add(task, result)
            tokens_per_s = sum(collector.summary.tokens.values()) / (time.perf_counter() - started)
            bar.set_postfix_str(f"{tqdm.format_sizeof(tokens_per_s)} tok/s", refresh=False)
            bar.update(docs)


def pool_start_method() -> str:
    """``fork`` on Linux (as torch's DataLoader does), else ``spawn``.

    Forked workers start at once with every module already imported, which matters for short
    runs: a spawned worker pays ~0.3 s of CPU for a fresh interpreter and its imports. Forking
    a process that has threads (torch starts one when imported) is safe here because a worker
    only runs file reads, JSON parsing, numpy and the tokenizer's ``encode``, none of which take
    a lock another thread of the parent could hold.
    """
    return "fork" if sys.platform.startswith("linux") else "spawn"


@contextlib.contextmanager
def _worker_pool(workers: int, chunk_args: tuple) -> Iterator[Any]:
    """A process pool, terminated on exit (also on error: pending chunks are dropped)."""
    context = multiprocessing.get_context(pool_start_method())
    with warnings.catch_warnings():
        # Python >= 3.12 warns on every fork of a process with threads; see pool_start_method.
        warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks")
        pool = context.Pool(workers, _init_worker, chunk_args)
    with pool:
        yield pool


def _ordered_results(
    pool: Any, tasks: Iterator[_Task], window: int
) -> Iterator[tuple[_Task, _ChunkResult | None]]:
    """Results in task order, with at most ``window`` chunks in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        job = None if task.problem else pool.apply_async(_work, (task,))
        pending.append((task._replace(data=None), job))
        while len(pending) > window:
            done, job = pending.popleft()
            yield done, job.get() if job else None
    while pending:
        done, job = pending.popleft()
        yield done, job.get() if job else None


class _Collector:
    """Check each chunk's result in order, write its documents and count what was skipped."""

    def __init__(
        self,
        files: list[str],
        writers: dict[str, IndexedDatasetWriter],
        summary: PreprocessSummary,
        skip_bad_lines: bool,
    ) -> None:
        self.files = files
        self.writers = writers
        self.summary = summary
        self.skip_bad_lines = skip_bad_lines
        self.lines_before = [0] * len(files)  # per file: lines in the chunks already taken

    def add(self, task: _Task, result: _ChunkResult | None) -> int:
        """Take one chunk's result; returns the number of documents written."""
        path = task.path
        if task.problem == "empty_file":
            if not self.skip_bad_lines:
                raise DataError(
                    f"{path}: the file is empty; remove it from the inputs {_SKIP_HINT}"
                )
            logger.warning("%s: the file is empty; skipped", path)
            self._skip("empty_file", 1, [f"{path} (empty file)"])
            return 0
        if task.problem:
            raise DataError(task.problem)
        assert result is not None
        base = self.lines_before[task.file_index]
        self.lines_before[task.file_index] += result.num_lines
        for line, reason, detail in result.bad_lines:
            if not self.skip_bad_lines:
                fix = SKIP_REASONS[reason][1]
                raise DataError(f"{path}:{base + line}: {detail}; {fix} {_SKIP_HINT}")
        if result.overflow is not None:
            line, key, token = result.overflow
            where = f"{path}:{base + line}: field {key!r}"
            raise token_overflow_error(where, token, self.writers[key].dtype)
        self.summary.lines += result.num_lines
        for reason, count in result.skipped.items():
            where = [
                f"{path}:{base + n} ({SKIP_REASONS[r][0]})"
                for n, r, _ in result.bad_lines
                if r == reason
            ]
            self._skip(reason, count, where)
        for key, flat, lengths in zip(self.writers, result.flat, result.lengths, strict=True):
            self.writers[key].add_array(flat, lengths)
            self.summary.tokens[key] += int(flat.size)
        self.summary.docs += int(result.line_numbers.size)
        return int(result.line_numbers.size)

    def _skip(self, reason: str, count: int, where: list[str]) -> None:
        self.summary.skipped[reason] = self.summary.skipped.get(reason, 0) + count
        room = MAX_EXAMPLES - len(self.summary.skipped_examples)
        self.summary.skipped_examples.extend(where[: max(room, 0)])


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {SKIP_REASONS[r][0]}" for r, n in sorted(counts.items())) or "none"
