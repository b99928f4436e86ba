"""Samples shown to people: decoded text with the prefix, sentinels and loss mask visible."""

from __future__ import annotations

import json

import numpy as np

PREFIX_MARK = " ‖ "  # between the bidirectional prefix and the causal part of a segment


def _segments(segment_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(segment id, begin, end) for each non-padding segment, in order."""
    out = []
    ids = np.asarray(segment_ids)
    change = np.flatnonzero(np.diff(ids)) + 1
    bounds = np.concatenate(([0], change, [len(ids)]))
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        if ids[begin] != 0:
            out.append((int(ids[begin]), int(begin), int(end)))
    return out


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _decoder_lines(sample: dict, decode) -> list[str]:
    tokens, labels = sample["tokens"], sample["labels"]
    loss = np.asarray(sample["loss_mask"]) > 0
    prefix = np.broadcast_to(np.asarray(sample["prefix_len"]), tokens.shape)
    lines = []
    for seg, begin, end in _segments(sample["segment_ids"]):
        cut = min(max(int(prefix[begin]), begin), end)
        shown = decode(tokens[begin:cut]) + PREFIX_MARK if cut > begin else ""
        shown += decode(tokens[cut:end])
        lines.append(f"  segment {seg}: positions {begin}-{end - 1}, prefix {cut - begin}, "
                     f"loss on {int(loss[begin:end].sum())}")
        lines.append(f"    inputs : {_quote(shown)}")
        lines.append(f"    targets: {_quote(decode(labels[begin:end][loss[begin:end]]))}")
    return lines


def _encoder_decoder_lines(sample: dict, decode) -> list[str]:
    lines = []
    enc_segments = {s: (b, e) for s, b, e in _segments(sample["encoder_segment_ids"])}
    loss = np.asarray(sample["decoder_loss_mask"]) > 0
    for seg, begin, end in _segments(sample["decoder_segment_ids"]):
        eb, ee = enc_segments.get(seg, (0, 0))
        lines.append(f"  segment {seg}: encoder {ee - eb} tokens, decoder {end - begin} tokens, "
                     f"loss on {int(loss[begin:end].sum())}")
        lines.append(f"    encoder: {_quote(decode(sample['encoder_tokens'][eb:ee]))}")
        labels = sample["decoder_labels"][begin:end][loss[begin:end]]
        lines.append(f"    decoder: {_quote(decode(labels))}")
    return lines


def render_text(index: int, sample: dict, decode, title: str = "") -> str:
    """A readable block for one sample: per segment, the inputs with ``‖`` after the
    bidirectional prefix, and the tokens that count in the loss."""
    sample = {k: np.asarray(v) for k, v in sample.items()}
    if "encoder_tokens" in sample:
        n = f"{len(sample['encoder_tokens'])}+{len(sample['decoder_tokens'])}"
        body = _encoder_decoder_lines(sample, decode)
    else:
        n = str(len(sample["tokens"]))
        body = _decoder_lines(sample, decode)
    head = f"── sample {index}{' · ' + title if title else ''} · {n} tokens"
    return "\n".join([head, *body])


def render_json(index: int, sample: dict) -> str:
    """One JSON object with every field the model receives, plus the sample index."""
    record = {"index": index}
    for key, value in sample.items():
        array = np.asarray(value)
        record[key] = array.tolist()
    return json.dumps(record)
