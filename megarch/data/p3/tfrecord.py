"""TFRecord files of ``tf.train.Example`` protos, read without TensorFlow or protobuf.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little-endian) | uint32 masked CRC32C of the 8 length bytes |
    data (length bytes)            | uint32 masked CRC32C of the data

where ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8`` (mod 2**32) and CRC32C is the
Castagnoli CRC (reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF).

A record holding a ``tf.train.Example`` is the protobuf encoding of::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }     // entries: key = 1, value = 2
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                             Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

:func:`read_examples` yields one dict per record (feature name -> list of bytes, floats or
ints), decoding only the features asked for (P3's token-id features are long varint lists
that preprocessing never needs). Every CRC is checked; a truncated or corrupt record, or a
record that is not an Example, raises :class:`~megarch.data.errors.DataError` naming the file
and the record index.

CRC32C comes from ``google-crc32c`` (a dependency: its C extension uses the CPU's CRC32
instruction where there is one). The numpy implementation below is kept as the fallback for a
platform without that wheel, where ``google_crc32c`` would otherwise fall back to a per-byte
Python loop about 25 times slower than ours; :data:`CRC_BACKEND` says which one runs.
``python tools/bench_crc.py`` measures the three.
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterator

import numpy as np

from megarch.data.errors import DataError

try:
    import google_crc32c as _google_crc32c
except ImportError:  # no wheel for this platform: the numpy fallback below
    _google_crc32c = None
if _google_crc32c is not None and getattr(_google_crc32c, "implementation", "c") != "c":
    _google_crc32c = None  # its pure-Python fallback: slower than ours
CRC_BACKEND = "google-crc32c" if _google_crc32c is not None else "numpy"
"""Which CRC32C implementation :func:`crc32c` and :func:`crc32c_many` use."""

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8
_BLOCK = 256
"""Bytes per block of the vectorised CRC (see :func:`crc32c`)."""


def _byte_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        table[byte] = crc
    return table


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _zero_shift(values: np.ndarray) -> np.ndarray:
    """The CRC registers ``values`` after one more zero byte (zero-initialised CRC)."""
    return _TABLE[values & 0xFF] ^ (values >> 8)


def _block_tables() -> np.ndarray:
    """``T[i, b]``: the zero-initialised CRC of a block whose byte ``i`` is ``b`` and whose
    other bytes are zero (so a block's CRC is the xor of ``T[i, block[i]]``)."""
    tables = np.empty((_BLOCK, 256), dtype=np.uint32)
    tables[_BLOCK - 1] = _TABLE
    for i in range(_BLOCK - 2, -1, -1):
        tables[i] = _zero_shift(tables[i + 1])
    return tables


_BLOCK_TABLES = _block_tables()
_SHIFT_TABLES: list[np.ndarray] = []
"""``_SHIFT_TABLES[k][j, b]``: a register holding ``b << 8j`` after ``_BLOCK * 2**k`` zero bytes
(built on demand by doubling)."""


def _shift_table(level: int) -> np.ndarray:
    while len(_SHIFT_TABLES) <= level:
        if not _SHIFT_TABLES:
            # a register r before a block acts as r xor-ed into the block's first 4 bytes
            _SHIFT_TABLES.append(_BLOCK_TABLES[:4].copy())
        else:
            _SHIFT_TABLES.append(_apply_shift(_SHIFT_TABLES[-1], _SHIFT_TABLES[-1]))
    return _SHIFT_TABLES[level]


def _apply_shift(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Registers ``values`` (any shape) shifted by the zero bytes that ``table`` encodes."""
    out = table[0][values & 0xFF]
    for j in range(1, 4):
        out ^= table[j][(values >> (8 * j)) & 0xFF]
    return out


def _crc32c_small(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_FLAT_BLOCK_TABLES = _BLOCK_TABLES.ravel()
_ROW_OFFSETS = (np.arange(_BLOCK, dtype=np.intp) * 256)


def _crc32c_same_blocks(chunks: list[bytes], blocks: int) -> np.ndarray:
    """CRC32C of ``chunks`` (each 4 .. ``blocks * _BLOCK`` bytes, ``blocks`` a power of 2)."""
    width = blocks * _BLOCK
    joined = b"".join(piece for chunk in chunks for piece in (bytes(width - len(chunk)), chunk))
    matrix = np.frombuffer(joined, dtype=np.uint8).reshape(len(chunks), width).copy()
    starts = width - np.fromiter(map(len, chunks), dtype=np.intp, count=len(chunks))
    rows = np.arange(len(chunks))[:, None]
    matrix[rows, starts[:, None] + np.arange(4)] ^= 0xFF  # the initial register 0xFFFFFFFF
    index = matrix.reshape(len(chunks), blocks, _BLOCK).astype(np.intp) + _ROW_OFFSETS
    crcs = np.bitwise_xor.reduce(_FLAT_BLOCK_TABLES[index], axis=2)
    for level in range(blocks.bit_length() - 1):
        crcs = _apply_shift(_shift_table(level), crcs[:, 0::2]) ^ crcs[:, 1::2]
    return crcs[:, 0] ^ np.uint32(0xFFFFFFFF)


def crc32c_many_numpy(chunks: list[bytes]) -> list[int]:
    """The CRC32C (Castagnoli) of each of ``chunks``, vectorised with numpy (the fallback).

    With a zero initial register the CRC is linear in the message and blind to leading zero
    bytes. So each message (its first 4 bytes xor-ed with the 0xFFFFFFFF initial value) is
    zero-padded in front to a power-of-two number of blocks, messages with the same number of
    blocks are stacked, a block's CRC is the xor of one table row per byte, and the block CRCs
    are combined pairwise in a tree, shifting the left one by the right one's length.
    """
    out = [0] * len(chunks)
    groups: dict[int, list[int]] = {}
    for i, chunk in enumerate(chunks):
        if len(chunk) < 4:
            out[i] = _crc32c_small(chunk)
        else:
            blocks = -(-len(chunk) // _BLOCK)
            groups.setdefault(1 << (blocks - 1).bit_length(), []).append(i)
    for blocks, members in groups.items():
        crcs = _crc32c_same_blocks([chunks[i] for i in members], blocks)
        for i, crc in zip(members, crcs.tolist(), strict=True):
            out[i] = crc
    return out


def crc32c_numpy(data: bytes) -> int:
    """The CRC32C (Castagnoli) of ``data`` without google-crc32c (see
    :func:`crc32c_many_numpy`)."""
    return _crc32c_small(data) if len(data) < 64 else crc32c_many_numpy([data])[0]


def crc32c_many(chunks: list[bytes]) -> list[int]:
    """The CRC32C (Castagnoli) of each of ``chunks``, with :data:`CRC_BACKEND`."""
    if _google_crc32c is not None:
        value = _google_crc32c.value
        return [value(chunk) for chunk in chunks]
    return crc32c_many_numpy(chunks)


def crc32c(data: bytes) -> int:
    """The CRC32C (Castagnoli) of ``data``, with :data:`CRC_BACKEND`."""
    if _google_crc32c is not None:
        return _google_crc32c.value(data)
    return crc32c_numpy(data)


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    return _mask(crc32c(data))


BATCH_RECORDS = 2048
"""Records read (and CRC-checked together) at a time."""


def _check_batch(path: str, first: int, batch: list[tuple[bytes, int]]) -> None:
    """DataError for the first record of ``batch`` ((data, its masked CRC) pairs) whose data
    CRC does not match."""
    crcs = crc32c_many([data for data, _ in batch])
    for offset, ((_, expected), crc) in enumerate(zip(batch, crcs, strict=True)):
        if _mask(crc) != expected:
            raise DataError(f"{path}: record {first + offset}: data CRC mismatch; the file is "
                            "corrupt: download it again")


def read_records(path: str, verify: bool = True) -> Iterator[bytes]:
    """The records of the TFRecord file ``path``, CRCs checked unless ``verify`` is False.
    DataError on a truncated file or a CRC mismatch, naming the file and record index.

    A length is checked as soon as it is read (a corrupt one must not make us read
    gigabytes); data CRCs are checked :data:`BATCH_RECORDS` records at a time
    (:func:`crc32c_many`), before any record of the batch is yielded.
    """
    with open(path, "rb") as f:
        index = 0
        batch: list[tuple[bytes, int]] = []
        while True:
            header = f.read(12)
            where = f"{path}: record {index + len(batch)}"
            if 0 < len(header) < 12:
                raise DataError(f"{where}: truncated header ({len(header)} of 12 bytes); the "
                                "file is incomplete: download it again")
            if header:
                length, length_crc = struct.unpack("<QI", header)
                if verify and _mask(crc32c(header[:8])) != length_crc:
                    raise DataError(f"{where}: length CRC mismatch; the file is corrupt (or "
                                    "not a TFRecord file): download it again")
                data = f.read(length)
                footer = f.read(4)
                if len(data) < length or len(footer) < 4:
                    raise DataError(f"{where}: truncated data ({len(data)} of {length} "
                                    "bytes); the file is incomplete: download it again")
                batch.append((data, struct.unpack("<I", footer)[0]))
            if batch and (not header or len(batch) >= BATCH_RECORDS):
                if verify:
                    _check_batch(path, index, batch)
                for data, _ in batch:
                    yield data
                index += len(batch)
                batch = []
            if not header:
                return


class _ProtoError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _ProtoError("varint runs past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _ProtoError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: ints for varint / fixed
    fields, bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _ProtoError("fixed64 runs past the end")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _ProtoError("length-delimited field runs past the end")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _ProtoError("fixed32 runs past the end")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        yield number, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int64_list(buf: bytes) -> list[int]:
    values = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 0:
            values.append(_signed64(value))
        elif wire == 2:  # packed
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                values.append(_signed64(item))
        else:
            raise _ProtoError(f"Int64List value with wire type {wire}")
    return values


def _float_list(buf: bytes) -> list[float]:
    values: list[float] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 5:
            values.append(struct.unpack("<f", value)[0])
        elif wire == 2 and len(value) % 4 == 0:  # packed
            values.extend(struct.unpack(f"<{len(value) // 4}f", value))
        else:
            raise _ProtoError(f"FloatList value with wire type {wire}")
    return values


def _feature(buf: bytes) -> list:
    """One Feature message: its list of bytes, floats or ints (empty if no kind is set)."""
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            return [v for n, w, v in _fields(value) if n == 1 and w == 2]
        if number == 2:
            return _float_list(value)
        if number == 3:
            return _int64_list(value)
    return []


def parse_example(record: bytes, features: Container[str] | None = None) -> dict[str, list]:
    """A serialized ``tf.train.Example`` as ``{name: values}``: bytes_list values as
    ``bytes``, float_list as ``float``, int64_list as ``int``. Only the names in ``features``
    are decoded (all when None). ValueError if the record is not a valid Example."""
    out: dict[str, list] = {}
    try:
        for number, wire, value in _fields(record):
            if number != 1 or wire != 2:
                continue
            for f_number, f_wire, entry in _fields(value):
                if f_number != 1 or f_wire != 2:
                    continue
                name, feature = None, b""
                for e_number, e_wire, e_value in _fields(entry):
                    if e_number == 1 and e_wire == 2:
                        name = e_value.decode("utf-8")
                    elif e_number == 2 and e_wire == 2:
                        feature = e_value
                if name is not None and (features is None or name in features):
                    out[name] = _feature(feature)
    except (_ProtoError, UnicodeDecodeError) as err:
        raise ValueError(f"not a tf.train.Example ({err})") from None
    return out


def read_examples(path: str, features: Container[str] | None = None,
                  verify: bool = True) -> Iterator[dict[str, list]]:
    """The Examples of TFRecord file ``path`` (see :func:`parse_example`); DataError naming
    the file and record index on a truncated, corrupt or non-Example record."""
    for index, record in enumerate(read_records(path, verify)):
        try:
            yield parse_example(record, features)
        except ValueError as err:
            raise DataError(f"{path}: record {index}: {err}; the file is corrupt or not a "
                            "file of tf.train.Example records") from None
