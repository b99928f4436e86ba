"""Training samples for each objective and layout, as dicts of tensors the model receives.

Decoder layout (causal and non-causal decoders), every field of length L = ``seq_len``:

- ``tokens`` int64: input ids.
- ``labels`` int64: the id each position predicts.
- ``loss_mask`` float32: 1 where the label counts in the loss.
- ``positions`` int64: position of the token within its segment.
- ``segment_ids`` int64: 1, 2, ... per packed segment; 0 marks padding.
- ``prefix_len`` int64: the bidirectional prefix. A scalar for unpacked rows; for packed rows
  one value per position. Key j is visible from query i iff ``segment_ids[i] == segment_ids[j]``
  and (``j <= i`` or ``j < prefix_len[i]``). 0 means purely causal. A causal decoder ignores it.

Encoder-decoder layout: ``encoder_tokens``, ``encoder_positions``, ``encoder_segment_ids`` of
length Le; ``decoder_tokens`` (targets shifted right, each segment starting with the tokenizer's
``bos_id``), ``decoder_labels``, ``decoder_loss_mask``, ``decoder_positions``,
``decoder_segment_ids`` of length Ld. A decoder query sees encoder keys of its own segment.

Objectives (PAPER.md):

- FLM: documents + EOS concatenated and cut into rows of L+1 tokens (one token of overlap);
  inputs ``row[:-1]``, labels ``row[1:]``, loss everywhere.
- PLM, decoder: the same rows; split s uniform in [1, L-1]; ``prefix_len = s`` and the loss
  counts labels ``row[s:]`` (positions s-1 onward).
- PLM, encoder-decoder: two L-token rows ex0, ex1 share one split s; the encoder gets
  ex0[:s] ++ ex1[:L-s], the decoder ex0[s:] ++ ex1[L-s:], two segments on each side.
- MLM: T5 span corruption of raw chunks (568 raw tokens for L=626: 512 inputs, 114 targets).
  Encoder-decoder: inputs -> encoder, targets -> decoder. Decoder: one sequence
  [inputs ; targets] shifted right behind ``bos_id``, prefix = BOS + inputs, loss on targets.
- Multitask: prompted (inputs, targets) examples packed greedily into rows with segment ids and
  per-segment positions, loss on targets; examples longer than ``inputs_len`` / ``targets_len``
  are truncated (keeping their final EOS) and counted.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megarch.data import span_corruption
from megarch.data.indices import (
    TokenRows,
    cached_arrays,
    epoch_permutation,
    pack_examples,
    sample_rng,
)

SALT_PLM, SALT_MLM = 11, 12


def dataset_fingerprint(prefix: str) -> str:
    """Identifies a dataset's content cheaply: path, sizes and modification time."""
    idx, bin_ = os.stat(prefix + ".idx"), os.stat(prefix + ".bin")
    return f"{os.path.abspath(prefix)}:{idx.st_size}:{idx.st_mtime_ns}:{bin_.st_size}"


def _tensors(fields: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in fields.items()}


def _segments(length: int, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1-based) and per-segment positions for segments beginning at ``starts``."""
    begins = np.zeros(length, dtype=np.int64)
    begins[starts] = 1
    segment_ids = np.cumsum(begins) + 1
    first = np.concatenate(([0], starts)).astype(np.int64)
    positions = np.arange(length, dtype=np.int64) - first[segment_ids - 1]
    return segment_ids, positions


def _shift_right(targets: np.ndarray, bos_id: int) -> np.ndarray:
    return np.concatenate(([bos_id], targets[:-1])).astype(np.int64)


class RowSamples(torch.utils.data.Dataset):
    """Base of the row-based objectives: sample i reads its rows from a :class:`TokenRows`."""

    def __init__(self, rows: TokenRows, tokenizer, seed: int):
        self.rows = rows
        self.vocab_size = tokenizer.vocab_size
        self.pad_id, self.eos_id, self.bos_id = tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _tensors(self.build(int(index)))

    def build(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` as numpy arrays."""
        raise NotImplementedError


class FLMSamples(RowSamples):
    """Full language modeling on rows of L+1 tokens."""

    def __init__(self, rows: TokenRows, tokenizer, seed: int, segment_docs: bool = False):
        super().__init__(rows, tokenizer, seed)
        self.segment_docs = segment_docs

    def build(self, index: int) -> dict[str, np.ndarray]:
        (row, doc_starts), = self.rows.sample_rows(index)
        length = len(row) - 1
        if self.segment_docs:
            segment_ids, positions = _segments(length, [s for s in doc_starts if s < length])
        else:
            segment_ids = np.ones(length, dtype=np.int64)
            positions = np.arange(length, dtype=np.int64)
        return {
            "tokens": row[:-1],
            "labels": row[1:],
            "loss_mask": np.ones(length, dtype=np.float32),
            "positions": positions,
            "segment_ids": segment_ids,
            "prefix_len": np.int64(0),
        }


class PLMDecoderSamples(RowSamples):
    """Prefix LM for decoders: a bidirectional prefix of s tokens, loss on the rest."""

    def build(self, index: int) -> dict[str, np.ndarray]:
        (row, _), = self.rows.sample_rows(index)
        length = len(row) - 1
        split = int(sample_rng(self.seed, index, SALT_PLM).integers(1, length))
        return {
            "tokens": row[:-1],
            "labels": row[1:],
            "loss_mask": (np.arange(length) >= split - 1).astype(np.float32),
            "positions": np.arange(length, dtype=np.int64),
            "segment_ids": np.ones(length, dtype=np.int64),
            "prefix_len": np.int64(split),
        }


class PLMEncoderDecoderSamples(RowSamples):
    """Prefix LM for encoder-decoders: the study's paired-row layout (two rows, one split)."""

    def build(self, index: int) -> dict[str, np.ndarray]:
        (ex0, _), (ex1, _) = self.rows.sample_rows(index)
        length = len(ex0)
        split = int(sample_rng(self.seed, index, SALT_PLM).integers(1, length))
        encoder = np.concatenate((ex0[:split], ex1[: length - split]))
        target0, target1 = ex0[split:], ex1[length - split :]
        enc_segments, enc_positions = _segments(length, [split])
        dec_segments, dec_positions = _segments(length, [length - split])
        return {
            "encoder_tokens": encoder,
            "encoder_positions": enc_positions,
            "encoder_segment_ids": enc_segments,
            "decoder_tokens": np.concatenate(
                (_shift_right(target0, self.bos_id), _shift_right(target1, self.bos_id))
            ),
            "decoder_labels": np.concatenate((target0, target1)),
            "decoder_loss_mask": np.ones(length, dtype=np.float32),
            "decoder_positions": dec_positions,
            "decoder_segment_ids": dec_segments,
        }


class MLMSamples(RowSamples):
    """T5 span corruption, in the encoder-decoder or the decoder-only layout."""

    def __init__(self, rows: TokenRows, tokenizer, seed: int, layout: str, seq_len: int,
                 noise_density: float, mean_noise_span: float):
        super().__init__(rows, tokenizer, seed)
        self.layout = layout
        self.seq_len = seq_len
        self.noise_density = noise_density
        self.mean_noise_span = mean_noise_span

    def build(self, index: int) -> dict[str, np.ndarray]:
        (raw, _), = self.rows.sample_rows(index)
        rng = sample_rng(self.seed, index, SALT_MLM)
        out = span_corruption.corrupt(
            raw, rng, self.vocab_size, self.eos_id, self.noise_density, self.mean_noise_span
        )
        if self.layout == "encoder_decoder":
            n_in, n_tgt = len(out.inputs), len(out.targets)
            return {
                "encoder_tokens": out.inputs,
                "encoder_positions": np.arange(n_in, dtype=np.int64),
                "encoder_segment_ids": np.ones(n_in, dtype=np.int64),
                "decoder_tokens": _shift_right(out.targets, self.bos_id),
                "decoder_labels": out.targets,
                "decoder_loss_mask": np.ones(n_tgt, dtype=np.float32),
                "decoder_positions": np.arange(n_tgt, dtype=np.int64),
                "decoder_segment_ids": np.ones(n_tgt, dtype=np.int64),
            }
        sequence = np.concatenate((out.inputs, out.targets))
        used, length, n_in = len(sequence), self.seq_len, len(out.inputs)
        tokens = np.full(length, self.pad_id, dtype=np.int64)
        labels = tokens.copy()
        tokens[:used] = _shift_right(sequence, self.bos_id)
        labels[:used] = sequence
        positions = np.arange(length, dtype=np.int64)
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": ((positions >= n_in) & (positions < used)).astype(np.float32),
            "positions": np.where(positions < used, positions, 0),
            "segment_ids": (positions < used).astype(np.int64),
            "prefix_len": np.int64(n_in + 1),
        }


def _truncate(tokens: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` tokens, keeping the final token (EOS) when cutting."""
    if len(tokens) <= limit:
        return tokens
    return np.concatenate((tokens[: limit - 1], tokens[-1:]))


class MultitaskSamples(torch.utils.data.Dataset):
    """Prompted (inputs, targets) examples packed into rows, loss on targets only."""

    def __init__(self, inputs, targets, doc_ids: np.ndarray, tokenizer, *, layout: str,
                 inputs_len: int, targets_len: int, num_samples: int | None, seed: int,
                 cache_dir: str, fingerprint: str):
        self.inputs, self.targets = inputs, targets
        self.layout = layout
        self.inputs_len, self.targets_len = inputs_len, targets_len
        self.pad_id, self.bos_id = tokenizer.pad_id, tokenizer.bos_id
        if layout == "encoder_decoder":
            def fits(used_in: int, used_tgt: int, n_in: int, n_tgt: int) -> bool:
                return used_in + n_in <= inputs_len and used_tgt + n_tgt <= targets_len
        else:
            def fits(used_in: int, used_tgt: int, n_in: int, n_tgt: int) -> bool:
                return used_in + used_tgt + n_in + n_tgt <= inputs_len + targets_len
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        description = {
            "kind": "packing", "data": fingerprint, "layout": layout, "seed": seed,
            "docs": [int(doc_ids[0]), int(doc_ids[-1]) + 1], "rows": num_samples,
            "inputs_len": inputs_len, "targets_len": targets_len,
        }

        def build() -> dict[str, np.ndarray]:
            return pack_examples(
                np.asarray(inputs.document_lengths), np.asarray(targets.document_lengths),
                lambda epoch: doc_ids[epoch_permutation(len(doc_ids), seed, epoch, salt=3)],
                num_samples, fits,
                inputs_len, targets_len,
            )

        arrays = cached_arrays(cache_dir, description, build)
        self.order, self.row_starts = arrays["order"], arrays["row_starts"]
        self.truncated = int(arrays["truncated"][0])

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _tensors(self.build(int(index)))

    def examples(self, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (inputs, targets) token arrays packed into row ``index``, truncated."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} is out of range: this index holds {len(self)}")
        ids = self.order[self.row_starts[index] : self.row_starts[index + 1]]
        return [
            (
                _truncate(self.inputs.document(int(d)).astype(np.int64), self.inputs_len),
                _truncate(self.targets.document(int(d)).astype(np.int64), self.targets_len),
            )
            for d in ids
        ]

    def build(self, index: int) -> dict[str, np.ndarray]:
        pairs = self.examples(index)
        if self.layout == "encoder_decoder":
            return self._encoder_decoder_row(pairs)
        return self._decoder_row(pairs)

    def _decoder_row(self, pairs) -> dict[str, np.ndarray]:
        length = self.inputs_len + self.targets_len
        row = _PackedRow(length, self.pad_id)
        prefix_len = np.zeros(length, dtype=np.int64)
        for inputs, targets in pairs:
            sequence = np.concatenate((inputs, targets))
            start = row.used
            row.add(_shift_right(sequence, self.bos_id), sequence, first_loss=len(inputs))
            prefix_len[start : row.used] = start + len(inputs) + 1
        return {**row.fields(""), "prefix_len": prefix_len}

    def _encoder_decoder_row(self, pairs) -> dict[str, np.ndarray]:
        encoder = _PackedRow(self.inputs_len, self.pad_id)
        decoder = _PackedRow(self.targets_len, self.pad_id)
        for inputs, targets in pairs:
            encoder.add(inputs, None, first_loss=0)
            decoder.add(_shift_right(targets, self.bos_id), targets, first_loss=0)
        enc, dec = encoder.fields("encoder_"), decoder.fields("decoder_")
        del enc["encoder_labels"], enc["encoder_loss_mask"]
        return {**enc, **dec}


class _PackedRow:
    """Accumulates segments into fixed-length arrays, padding the rest."""

    def __init__(self, length: int, pad_id: int):
        self.tokens = np.full(length, pad_id, dtype=np.int64)
        self.labels = self.tokens.copy()
        self.loss_mask = np.zeros(length, dtype=np.float32)
        self.positions = np.zeros(length, dtype=np.int64)
        self.segment_ids = np.zeros(length, dtype=np.int64)
        self.used = 0
        self.count = 0

    def add(self, tokens: np.ndarray, labels: np.ndarray | None, first_loss: int) -> None:
        begin, end = self.used, self.used + len(tokens)
        self.count += 1
        self.tokens[begin:end] = tokens
        if labels is not None:
            self.labels[begin:end] = labels
            self.loss_mask[begin + first_loss : end] = 1.0
        self.positions[begin:end] = np.arange(len(tokens))
        self.segment_ids[begin:end] = self.count
        self.used = end

    def fields(self, prefix: str) -> dict[str, np.ndarray]:
        names = {"tokens": self.tokens, "labels": self.labels, "loss_mask": self.loss_mask,
                 "positions": self.positions, "segment_ids": self.segment_ids}
        return {prefix + k: v for k, v in names.items()}
