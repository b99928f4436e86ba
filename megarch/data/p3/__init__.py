"""Real multitask data: T0's training mixture and held-out tasks from a P3 download, offline.

- :mod:`~megarch.data.p3.tfrecord`: TFRecord files of ``tf.train.Example`` records, read
  without TensorFlow or protobuf (CRC32C checked, a minimal protobuf decoder).
- :mod:`~megarch.data.p3.tables`: T0's training mixture and T0-Eval as P3 folder names.
- :mod:`~megarch.data.p3.prepare`: :func:`prepare_p3`, what ``megarch-data p3`` runs: MTF jsonl
  per dataset and megarch-eval task files.
"""

from megarch.data.p3.prepare import format_summary, prepare_p3
from megarch.data.p3.tables import EVAL_SUITES, MIXTURES, T0_EVAL, T0_TRAIN, P3Dataset
from megarch.data.p3.tfrecord import crc32c, masked_crc32c, parse_example, read_examples

__all__ = [
    "EVAL_SUITES",
    "MIXTURES",
    "P3Dataset",
    "T0_EVAL",
    "T0_TRAIN",
    "crc32c",
    "format_summary",
    "masked_crc32c",
    "parse_example",
    "prepare_p3",
    "read_examples",
]
