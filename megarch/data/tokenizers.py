"""Tokenizers: one interface over SentencePiece, Hugging Face ``tokenizers`` and raw bytes.

Conventions (T5's, which the paper uses):

* ``vocab_size`` counts everything, the 100 sentinels included (T5: 32,000 pieces + 100 =
  32,100; the model pads its embedding further, e.g. to 32,128, which is not the tokenizer's
  business). Sentinels count down from the top: ``<extra_id_k>`` is ``vocab_size - 1 - k``.
  When the backend has no ``<extra_id_k>`` entries they are added virtually above its ids.
* ``bos_id`` is the decoder-start token and equals ``pad_id``.
* :meth:`Tokenizer.encode` treats its input as plain text: it never appends EOS and never
  produces pad, EOS or sentinel ids, even when the text contains ``"</s>"`` or
  ``"<extra_id_0>"`` literally (as seqio does; a document that mentions T5's sentinels must not
  inject them). Special ids are placed by the sample builders.
* :meth:`Tokenizer.decode` shows sentinels as ``<extra_id_k>``; EOS as ``</s>`` and PAD as
  ``<pad>`` (the same strings on every backend) when ``show_special`` is true, nothing otherwise.

A tokenizer is rebuilt from its ``spec`` string (:func:`load_tokenizer`); pickling sends only that
string, so a data-loader worker reloads the file instead of copying the backend's state.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from megarch.atomic import atomic_file, temporary_name
from megarch.data.errors import DataError, make_output_dir

log = logging.getLogger(__name__)

N_SENTINELS = 100
"""Number of sentinel tokens ``<extra_id_0..99>`` every tokenizer carries (T5)."""

EOS_TEXT = "</s>"
PAD_TEXT = "<pad>"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]")
UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")
DIRECTORY_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")
"""Files looked for, in this order, when a tokenizer spec names a directory."""

ACCEPTED_SPECS = (
    "'bytes' (UTF-8 bytes, no file needed); a SentencePiece '.model' file; a Hugging Face "
    "'tokenizer.json' file, optionally followed by '?eos=<token>&pad=<token>'; or a directory "
    f"holding one of {', '.join(DIRECTORY_FILES)}"
)


def sentinel_piece(k: int) -> str:
    """The text of sentinel ``k``: ``<extra_id_k>``."""
    return f"<extra_id_{k}>"


class Tokenizer(abc.ABC):
    """Text <-> token ids, with T5's special-token conventions (see the module docstring).

    Attributes:
        spec: the string :func:`load_tokenizer` rebuilds this tokenizer from.
        vocab_size: number of ids, the ``n_sentinels`` sentinels included.
        pad_id: padding id; also the decoder-start id (:attr:`bos_id`).
        eos_id: end-of-sequence id.
        unk_id: unknown-token id, or None when the backend has none.
    """

    n_sentinels: int = N_SENTINELS

    def __init__(
        self, spec: str, *, vocab_size: int, pad_id: int, eos_id: int, unk_id: int | None
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        self._fingerprint: str | None = None

    # ----- identity -------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short human-readable name, e.g. ``sentencepiece(spiece.model)``."""

    @abc.abstractmethod
    def _fingerprint_material(self) -> bytes:
        """Bytes that determine the id mapping (file content and options)."""

    def fingerprint(self) -> str:
        """16 hex digits identifying the id mapping: changes when the file or options change."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"{type(self).__name__}\n{self.n_sentinels}\n".encode())
            h.update(self._fingerprint_material())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return load_tokenizer, (self._portable_spec(),)

    def _portable_spec(self) -> str:
        """The spec with an absolute path, so a worker with another cwd loads the same file."""
        return self.spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"

    # ----- special ids ----------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        """Decoder-start id; T5 convention: the pad id."""
        return self.pad_id

    def sentinel_id(self, k: int) -> int:
        """Id of ``<extra_id_k>``: ``vocab_size - 1 - k``."""
        if not 0 <= k < self.n_sentinels:
            raise ValueError(f"sentinel index {k} out of range [0, {self.n_sentinels})")
        return self.vocab_size - 1 - k

    def is_sentinel(self, ids: np.ndarray) -> np.ndarray:
        """Boolean array: which of ``ids`` are sentinels."""
        ids = np.asarray(ids)
        return (ids >= self.vocab_size - self.n_sentinels) & (ids < self.vocab_size)

    # ----- encoding -------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended; special strings in the text stay text)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text, through the backend's batch call where it has one."""
        return [self.encode(t) for t in texts]

    # ----- decoding -------------------------------------------------------------------------

    @abc.abstractmethod
    def _decode_ordinary(self, ids: list[int]) -> str:
        """Backend decoding of ids that are neither pad, EOS nor sentinels."""

    @abc.abstractmethod
    def _backend_piece(self, i: int) -> str:
        """The backend's piece string for a non-sentinel id."""

    def _space_before(self, first_id: int) -> str:
        """Text to put before a run decoded after a special token (its leading space)."""
        return ""

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (``<extra_id_k>`` for sentinels)."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range [0, {self.vocab_size}) for {self.name}")
        if self.is_sentinel(np.asarray(i)):
            return sentinel_piece(self.vocab_size - 1 - i)
        return self._backend_piece(i)

    def decode(self, ids: Iterable[int] | np.ndarray, show_special: bool = True) -> str:
        """Text of ``ids``: sentinels as ``<extra_id_k>``; EOS/PAD as ``</s>``/``<pad>`` when
        ``show_special``, else omitted. Arrays are flattened; ids outside ``[0, vocab_size)``
        raise ValueError."""
        arr = np.asarray(ids if hasattr(ids, "__array__") else list(ids), dtype=np.int64)
        arr = arr.reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} out of range [0, {self.vocab_size}) for {self.name}")
        special = (arr == self.pad_id) | (arr == self.eos_id) | self.is_sentinel(arr)
        if not special.any():
            return self._decode_ordinary(arr.tolist())
        parts: list[str] = []
        start = 0
        for pos in [*np.flatnonzero(special).tolist(), arr.size]:
            if pos > start:
                run = arr[start:pos].tolist()
                lead = self._space_before(run[0]) if start > 0 else ""
                parts.append(lead + self._decode_ordinary(run))
            if pos < arr.size:
                parts.append(self._special_text(int(arr[pos]), show_special))
            start = pos + 1
        return "".join(parts)

    def _special_text(self, i: int, show_special: bool) -> str:
        if i == self.eos_id:
            return EOS_TEXT if show_special else ""
        if i == self.pad_id:
            return PAD_TEXT if show_special else ""
        return sentinel_piece(self.vocab_size - 1 - i)


# ----- bytes ------------------------------------------------------------------------------------


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: pad 0, EOS 1, unk 2, byte ``b`` -> ``b + 3``, sentinels 259..358."""

    OFFSET = 3

    def __init__(self) -> None:
        super().__init__(
            "bytes", vocab_size=256 + self.OFFSET + N_SENTINELS, pad_id=0, eos_id=1, unk_id=2
        )

    @property
    def name(self) -> str:
        return "bytes"

    def _fingerprint_material(self) -> bytes:
        return b"utf-8 bytes, offset 3"

    def encode(self, text: str) -> list[int]:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return (raw.astype(np.int32) + self.OFFSET).tolist()

    def _decode_ordinary(self, ids: list[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64) - self.OFFSET
        # unk becomes 0xFF, which is never valid UTF-8, so it decodes to U+FFFD like bad bytes.
        raw = np.where(arr >= 0, arr, 0xFF).astype(np.uint8).tobytes()
        return raw.decode("utf-8", errors="replace")

    def _backend_piece(self, i: int) -> str:
        if i < self.OFFSET:
            return (PAD_TEXT, EOS_TEXT, "<unk>")[i]
        b = i - self.OFFSET
        return chr(b) if 0x21 <= b <= 0x7E else f"<0x{b:02X}>"


# ----- SentencePiece ----------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _sentinel_layout(path: str, found: list[int | None], backend_size: int) -> int:
    """Check ``<extra_id_k>`` entries already in a vocabulary; return the full vocab size.

    ``found[k]`` is the id of ``<extra_id_k>`` in the backend or None. None for all k: the
    sentinels are virtual, above the backend's ids. All present: they must sit at the top.
    """
    present = [k for k, i in enumerate(found) if i is not None]
    if not present:
        return backend_size + N_SENTINELS
    if len(present) != N_SENTINELS:
        missing = sorted(set(range(N_SENTINELS)) - set(present))
        raise DataError(
            f"{path}: has {len(present)} of the {N_SENTINELS} sentinel tokens <extra_id_k> "
            f"(missing k={missing[:5]}...); a vocabulary must have all of them or none (then "
            "they are added above its ids): rebuild it, e.g. with megarch-data train-tokenizer"
        )
    for k, i in enumerate(found):
        if i != backend_size - 1 - k:
            raise DataError(
                f"{path}: {sentinel_piece(k)} has id {i} but T5's convention puts it at "
                f"vocab_size-1-k = {backend_size - 1 - k}; use a vocabulary without "
                "<extra_id_k> entries (megarch adds them on top) or with them at the top ids"
            )
    return backend_size


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (T5's ``spiece.model`` layout: pad 0, EOS 1, unk 2).

    The sentinels are appended virtually above the model's pieces, as T5 does: a 32,000-piece
    model gives ``vocab_size`` 32,100 with ``<extra_id_0>`` = 32,099.
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise DataError(
                f"SentencePiece model {model_path} not found; train one with "
                "`megarch-data train-tokenizer` or use the tokenizer spec 'bytes'"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(model_path)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"{model_path} is not a readable SentencePiece model ({e}); "
                "retrain it with `megarch-data train-tokenizer`"
            ) from e
        n = self._sp.get_piece_size()
        pad, eos, unk = self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()
        for what, i in (("pad", pad), ("eos", eos)):
            if i < 0:
                raise DataError(
                    f"{model_path} defines no {what} piece; megarch needs pad and eos (T5 "
                    "layout: pad 0, eos 1, unk 2): retrain with `megarch-data train-tokenizer`"
                )
        found = []
        for k in range(N_SENTINELS):
            i = self._sp.piece_to_id(sentinel_piece(k))
            found.append(i if self._sp.id_to_piece(i) == sentinel_piece(k) else None)
        vocab_size = _sentinel_layout(model_path, found, n)
        super().__init__(model_path, vocab_size=vocab_size, pad_id=pad, eos_id=eos, unk_id=unk)
        self._n_pieces = n

    @property
    def name(self) -> str:
        return f"sentencepiece({os.path.basename(self.spec)})"

    def _portable_spec(self) -> str:
        return os.path.abspath(self.spec)

    def _fingerprint_material(self) -> bytes:
        return _read_bytes(self.spec)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def _decode_ordinary(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _backend_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def _space_before(self, first_id: int) -> str:
        # SentencePiece drops the leading "▁" of a decoded sequence; inside a text it is a space.
        return " " if self._sp.id_to_piece(first_id).startswith("\u2581") else ""


# ----- Hugging Face tokenizers ------------------------------------------------------------------


def _find_token(
    path: str, vocab: dict[str, int], given: str | None, candidates: Sequence[str], what: str
) -> int | None:
    """Id of the ``given`` token (which must exist) or of the first candidate present."""
    if given is not None:
        if given not in vocab:
            raise DataError(
                f"{path}: the {what} token {given!r} given in the tokenizer spec is not in its "
                "vocabulary; name a token it has"
            )
        return vocab[given]
    return next((vocab[c] for c in candidates if c in vocab), None)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``).

    EOS and PAD are found among common names (``</s>``, ``<|endoftext|>``, ``<eos>``; ``<pad>``,
    ``<|padding|>``) unless given; without a pad token, EOS doubles as PAD. Sentinels: the
    file's ``<extra_id_k>`` tokens if it has them (T5's has, at the top), else virtual ones
    above its largest id. Truncation/padding stored in the file are switched off, and special
    tokens in the text are encoded as text (the library still matches *non-special* added
    tokens, so a file that adds ``<extra_id_k>`` as non-special tokens will turn them into ids).
    """

    def __init__(
        self, tokenizer_json_path: str, eos_token: str | None = None, pad_token: str | None = None
    ) -> None:
        from tokenizers import Tokenizer as _HF

        path = tokenizer_json_path
        if not os.path.isfile(path):
            raise DataError(
                f"tokenizer file {path} not found; accepted tokenizers: {ACCEPTED_SPECS}"
            )
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise DataError(f"{path} is not a readable Hugging Face tokenizer.json ({e})") from e
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = True  # special strings in text stay text
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eos = _find_token(path, vocab, eos_token, EOS_CANDIDATES, "eos")
        if eos is None:
            raise DataError(
                f"{path}: no end-of-sequence token among {list(EOS_CANDIDATES)}; name it in the "
                f"spec: '{path}?eos=<token>'"
            )
        pad = _find_token(path, vocab, pad_token, PAD_CANDIDATES, "pad")
        unk = _find_token(path, vocab, None, UNK_CANDIDATES, "unk")
        found = [vocab.get(sentinel_piece(k)) for k in range(N_SENTINELS)]
        self._backend_size = max(vocab.values()) + 1
        vocab_size = _sentinel_layout(path, found, self._backend_size)
        options = {k: v for k, v in (("eos", eos_token), ("pad", pad_token)) if v is not None}
        spec = path + ("?" + urllib.parse.urlencode(options) if options else "")
        pad = eos if pad is None else pad
        super().__init__(spec, vocab_size=vocab_size, pad_id=pad, eos_id=eos, unk_id=unk)
        self.path = path
        self._options = options

    @property
    def name(self) -> str:
        return f"hf({os.path.basename(self.path)})"

    def _portable_spec(self) -> str:
        query = urllib.parse.urlencode(self._options)
        return os.path.abspath(self.path) + ("?" + query if query else "")

    def _fingerprint_material(self) -> bytes:
        return json.dumps(self._options, sort_keys=True).encode() + b"\n" + _read_bytes(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: >=0.20
        encodings = batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def _decode_ordinary(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _backend_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(i)
        return piece if piece is not None else f"<unused_{i}>"

    def _space_before(self, first_id: int) -> str:
        # Metaspace decoders (SentencePiece-style) drop the leading "▁" of a decoded run.
        piece = self._tok.id_to_token(first_id) or ""
        return " " if piece.startswith("\u2581") else ""


# ----- loading ----------------------------------------------------------------------------------


def _split_options(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``path?eos=..&pad=..`` into the path and its options (only for a missing path)."""
    if "?" not in spec or os.path.exists(spec):
        return spec, {}
    path, query = spec.split("?", 1)
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"eos", "pad"})
    if unknown:
        raise DataError(
            f"tokenizer spec {spec!r}: unknown options {unknown}; only 'eos' and 'pad' exist"
        )
    return path, options


def load_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from its spec string; accepted forms: see :data:`ACCEPTED_SPECS`."""
    if spec == "bytes":
        return ByteTokenizer()
    path, options = _split_options(spec)
    if os.path.isdir(path):
        inside = [f for f in DIRECTORY_FILES if os.path.isfile(os.path.join(path, f))]
        if not inside:
            raise DataError(
                f"tokenizer directory {path} holds none of {', '.join(DIRECTORY_FILES)}; "
                f"accepted tokenizers: {ACCEPTED_SPECS}"
            )
        path = os.path.join(path, inside[0])
    if options and not path.endswith(".json"):
        raise DataError(f"tokenizer spec {spec!r}: '?eos=..&pad=..' only applies to .json files")
    if path.endswith(".model"):  # a missing file is reported by the class, with the fix
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path, eos_token=options.get("eos"), pad_token=options.get("pad"))
    if not os.path.exists(path):
        raise DataError(f"tokenizer {spec!r} not found; accepted tokenizers: {ACCEPTED_SPECS}")
    raise DataError(f"tokenizer {spec!r}: unknown kind of file; accepted: {ACCEPTED_SPECS}")


# ----- training ---------------------------------------------------------------------------------


def _jsonl_texts(paths: Sequence[str], key: str, progress: bool) -> Iterator[str]:
    """The ``key`` field of every line of the jsonl files; DataError names file:line."""
    from tqdm import tqdm

    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenizer text",
        disable=not progress,
        leave=False,
    ) as bar:
        for path in paths:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    bar.update(len(line))
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except UnicodeDecodeError as e:
                        raise DataError(
                            f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x}); "
                            "re-encode the file as UTF-8"
                        ) from None
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one "
                            "JSON object"
                        ) from e
                    text = record.get(key) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise DataError(
                            f"{path}:{lineno}: no string field {key!r}; give each line one, or "
                            "pass the field name that holds the text"
                        )
                    yield text


def _split_sentence(line: str, max_bytes: int) -> Iterator[str]:
    """Pieces of ``line`` of at most ``max_bytes`` UTF-8 bytes, cut at spaces where possible."""
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    chunk: list[str] = []
    size = 0
    for word in line.split(" "):
        n = len(word.encode("utf-8")) + 1
        if size + n > max_bytes and chunk:
            yield " ".join(chunk)
            chunk, size = [], 0
        if n > max_bytes:  # one overlong "word": cut by characters (<= 4 bytes each)
            step = max(1, max_bytes // 4)
            yield from (word[i : i + step] for i in range(0, len(word), step))
            continue
        chunk.append(word)
        size += n
    if chunk:
        yield " ".join(chunk)


def training_sentences(texts: Iterable[str], max_sentence_bytes: int) -> Iterator[str]:
    """Non-empty lines of the documents, each cut to at most ``max_sentence_bytes`` bytes."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield from _split_sentence(line, max_sentence_bytes)


def _run_trainer(texts: Iterable[str], what: str, **trainer_args: Any) -> int:
    """Train SentencePiece on the lines of ``texts``; return how many sentences it read.

    An error raised while reading the input (e.g. a DataError naming a bad line) comes out as
    itself, not as the RuntimeError sentencepiece wraps it in; trainer failures become DataError.
    """
    import sentencepiece as spm

    count = 0
    errors: list[BaseException] = []

    def sentences() -> Iterator[str]:
        nonlocal count
        try:
            for s in training_sentences(texts, trainer_args["max_sentence_length"]):
                count += 1
                yield s
        except BaseException as e:
            errors.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), **trainer_args)
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        if count == 0:
            raise DataError(f"no text in {what}; give the files some documents") from None
        asked = trainer_args["vocab_size"] + N_SENTINELS
        raise DataError(
            f"sentencepiece training on {what} failed: {e}; if the vocabulary is too large for "
            f"the text, pass a smaller vocab_size (asked {asked}) or more text"
        ) from None
    return count


def train_sentencepiece(
    input_jsonl_paths: Sequence[str],
    output_prefix: str,
    vocab_size: int = 8000,
    key: str = "text",
    model_type: str = "unigram",
    max_sentence_length: int = 4192,
    character_coverage: float = 0.9995,
    max_sentences: int = 10_000_000,
    num_threads: int | None = None,
    progress: bool = True,
) -> str:
    """Train a T5-style SentencePiece model on jsonl text; return the ``.model`` path.

    The model has ``vocab_size - 100`` pieces (pad 0, EOS 1, unk 2, no BOS, byte fallback so
    every text encodes); with the 100 virtual sentinels its tokenizer's ``vocab_size`` is exactly
    ``vocab_size``. ``<output_prefix>.model`` and ``.vocab`` are published atomically.

    Args:
        input_jsonl_paths: jsonl files; each line an object with the text under ``key``.
        output_prefix: output path without extension (a trailing ``.model`` is ignored).
        vocab_size: the tokenizer's total vocabulary, sentinels included.
        key: the field holding the text.
        model_type: ``unigram`` (T5) or ``bpe``, ``char``, ``word``.
        max_sentence_length: longest training sentence in bytes; longer lines are cut.
        character_coverage: fraction of characters covered by pieces (rest: byte fallback).
        max_sentences: sentences sampled for training when the input has more.
        num_threads: trainer threads; default the CPU count.
        progress: show a progress bar over the input bytes.
    """
    paths = [os.fspath(p) for p in input_jsonl_paths]
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"tokenizer training input {p} not found; pass existing jsonl files")
    if not paths:
        raise DataError("no training input given; pass one or more jsonl files")
    if output_prefix.endswith(".model"):
        output_prefix = output_prefix[: -len(".model")]
    make_output_dir(os.path.dirname(os.path.abspath(output_prefix)), "--output")
    tmp_prefix = temporary_name(output_prefix)
    try:
        n_sentences = _run_trainer(
            _jsonl_texts(paths, key, progress),
            f"{paths} (key {key!r})",
            model_prefix=tmp_prefix,
            vocab_size=vocab_size - N_SENTINELS,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            byte_fallback=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if log.isEnabledFor(logging.DEBUG) else 2,
        )
        with atomic_file(output_prefix + ".vocab") as vocab_tmp:
            os.replace(tmp_prefix + ".vocab", vocab_tmp)
        with atomic_file(output_prefix + ".model") as model_tmp:  # last: loaders look for it
            os.replace(tmp_prefix + ".model", model_tmp)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    log.info(
        "trained %s.model on %d sentences: vocab_size %d (%d pieces + %d sentinels)",
        output_prefix,
        n_sentences,
        vocab_size,
        vocab_size - N_SENTINELS,
        N_SENTINELS,
    )
    return output_prefix + ".model"
