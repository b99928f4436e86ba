"""A TFRecord / tf.train.Example writer and P3-like task folders, independent of megarch.

The CRC is computed bit by bit (no table) and the protobuf encoding written field by field from
the message definitions, so the reader under test is checked against separate code.
"""

from __future__ import annotations

import json
import os
import struct

Value = bytes | str | int | float | bool


def crc32c_bitwise(data: bytes) -> int:
    """CRC32C one bit at a time (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values: list[Value], packed: bool) -> bytes:
    if all(isinstance(v, (bytes, str)) for v in values):
        items = b"".join(_field(1, v.encode() if isinstance(v, str) else v) for v in values)
        return _field(1, items)  # BytesList
    if all(isinstance(v, float) for v in values):
        if packed:
            return _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))
        return _field(2, b"".join(_varint(1 << 3 | 5) + struct.pack("<f", v) for v in values))
    ints = [int(v) for v in values]  # int64 (bools stored as ints, as TensorFlow does)
    if packed:
        return _field(3, _field(1, b"".join(_varint(v) for v in ints)))
    return _field(3, b"".join(_varint(1 << 3) + _varint(v) for v in ints))


def encode_example(features: dict[str, list[Value]], packed: bool = True) -> bytes:
    """A serialized tf.train.Example of ``features`` (name -> list of one kind of value)."""
    entries = b"".join(
        _field(1, _field(1, name.encode()) + _field(2, _feature(values, packed)))
        for name, values in features.items())
    return _field(1, entries)


def write_tfrecord(path: str, records: list[bytes]) -> None:
    """A TFRecord file of ``records`` with correct (masked CRC32C) framing."""
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked(crc32c_bitwise(length))))
            f.write(data + struct.pack("<I", masked(crc32c_bitwise(data))))


def write_task_folder(root: str, name: str, split: str, examples: list[dict[str, list]],
                      stats_count: int | None = None, completed: bool = True) -> str:
    """A P3 task folder ``root/name`` with one split (and its info/stats json, COMPLETED)."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    write_tfrecord(os.path.join(folder, f"{split}.tfrecord-00000-of-00001"),
                   [encode_example(e) for e in examples])
    features = {key: {"dtype": "string" if isinstance(values[0], str) else "int32",
                      "shape": [None]} for key, values in examples[0].items()}
    with open(os.path.join(folder, f"info.{split}.json"), "w") as f:
        json.dump({"features": features, "num_shards": 1}, f)
    with open(os.path.join(folder, f"stats.{split}.json"), "w") as f:
        json.dump({"examples": len(examples) if stats_count is None else stats_count}, f)
    if completed:
        open(os.path.join(folder, "COMPLETED"), "w").close()
    return folder


def prompted(inputs: str, target: str, choices: list[str] | None = None) -> dict[str, list]:
    """A plain P3 record: texts (target with P3's leading space), token ids, choices."""
    example: dict[str, list] = {
        "inputs_pretokenized": [inputs], "targets_pretokenized": [" " + target],
        "inputs": [ord(c) for c in inputs[:8]], "targets": [ord(c) for c in target[:8]]}
    if choices is not None:
        example["answer_choices"] = list(choices)
    return example


def score_eval(inputs: str, choices: list[str], label: int, index: int) -> list[dict]:
    """The ``_score_eval`` records of one example: one per choice."""
    return [{"idx": [index, c], "inputs_pretokenized": [inputs],
             "targets_pretokenized": [choice], "is_correct": [c == label], "weight": [1.0]}
            for c, choice in enumerate(choices)]


def protobuf_example_class():
    """tf.train.Example built by the protobuf package from its message definitions (module
    docstring of megarch.data.p3.tfrecord), for an encoder that is not ours."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="megarch_test_example.proto",
                                               package="mt", syntax="proto3")
    for name, kind in (("BytesList", field.TYPE_BYTES), ("FloatList", field.TYPE_FLOAT),
                       ("Int64List", field.TYPE_INT64)):
        proto.message_type.add(name=name).field.add(
            name="value", number=1, label=field.LABEL_REPEATED, type=kind)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, kind) in enumerate((("bytes_list", "BytesList"),
                                           ("float_list", "FloatList"),
                                           ("int64_list", "Int64List")), 1):
        feature.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                          type=field.TYPE_MESSAGE, type_name=f".mt.{kind}", oneof_index=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_STRING)
    entry.field.add(name="value", number=2, label=field.LABEL_OPTIONAL,
                    type=field.TYPE_MESSAGE, type_name=".mt.Feature")
    features.field.add(name="feature", number=1, label=field.LABEL_REPEATED,
                       type=field.TYPE_MESSAGE, type_name=".mt.Features.FeatureEntry")
    proto.message_type.add(name="Example").field.add(
        name="features", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_MESSAGE,
        type_name=".mt.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mt.Example"))
