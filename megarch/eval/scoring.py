"""Batched log-likelihood of a continuation given a context, for every architecture.

The model inputs follow the training samples (megarch.data.samples), inputs going to the
encoder / the prefix and targets to the decoder / after it:

- causal and non-causal decoder: one sequence ``[context ; continuation]`` shifted right behind
  a start token: ``tokens = [START, context, continuation[:-1]]``; the labels of the
  continuation positions are scored. The non-causal decoder's bidirectional prefix is START +
  context (``prefix_len = len(context) + 1``, as ``prefix_len = len(inputs) + 1`` in training):
  every context token sees the whole context, no context token sees the continuation.
- encoder-decoder: the context to the encoder, ``decoder_tokens = [BOS, continuation[:-1]]``.

Which start token, and where EOS goes, depends on what the model was trained on
(:func:`run_format`): MLM and multitask samples are T5's (inputs ending with EOS, targets ending
with EOS, decoder-only sequences shifted right behind BOS); FLM and PLM rows are cut from the
running token stream (documents + EOS), so a prompt is the start of a document (after the
previous one's EOS) and its continuation follows it directly. The caller adds the EOS ids
(:func:`megarch.eval.rank_classification.encode_pair`); this module scores exactly the ids it is
given. Logits of ids >= the tokenizer's vocabulary (the
model's padding rows) are excluded from the softmax: they are never real tokens.

Contexts longer than ``max_len`` allows are cut from the left (the end of a prompt, next to the
answer, is kept): decoder: ``len(context) + len(continuation) <= max_len``; encoder-decoder:
``len(context) <= max_len``. A batch is right-padded with segment id 0 (padding attends to and
is seen by nothing), so batching does not change a score beyond float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megarch.model import EncoderDecoderLM

log = logging.getLogger(__name__)


START_TOKENS = ("bos", "eos")


def run_format(config) -> dict[str, object]:
    """Input conventions consistent with a run's training samples (module docstring):
    ``{"prompt_eos", "choice_eos", "decoder_start"}`` for its ``data.objective``.

    ``choice_eos`` is True for every objective: T5 targets end with EOS and so do documents,
    and the study's rank classification scores the targets' EOS.
    """
    t5_style = config.data.objective in ("mlm", "multitask")
    return {"prompt_eos": t5_style, "choice_eos": True,
            "decoder_start": "bos" if t5_style else "eos"}


def start_id(model: torch.nn.Module, tokenizer, decoder_start: str) -> int:
    """The first decoder input id: always BOS for the encoder-decoder (every sample has it);
    for decoder-only models BOS or EOS as ``decoder_start`` says."""
    if decoder_start not in START_TOKENS:
        raise ValueError(f"decoder_start={decoder_start!r}: use one of {START_TOKENS}")
    if isinstance(model, EncoderDecoderLM) or decoder_start == "bos":
        return tokenizer.bos_id
    return tokenizer.eos_id


@dataclass
class ContinuationScore:
    """The log-likelihood of one continuation."""

    logprob: float
    """Sum of the log-probabilities of the continuation's tokens."""
    n_tokens: int
    """How many tokens were scored."""
    greedy: bool
    """Whether every continuation token is the argmax of its distribution."""

    @property
    def mean_logprob(self) -> float:
        """Length-normalised score: the mean log-probability per token."""
        return self.logprob / max(self.n_tokens, 1)


def truncate_context(context: list[int], continuation: list[int], max_len: int | None,
                     encoder_decoder: bool) -> list[int]:
    """``context`` cut from the left to fit ``max_len`` (see the module docstring)."""
    if max_len is None:
        return context
    room = max_len if encoder_decoder else max_len - len(continuation)
    if room < (1 if encoder_decoder else 0):
        raise ValueError(f"a continuation of {len(continuation)} tokens leaves no room for the "
                         f"context within max_len={max_len}; raise max_len")
    return context[len(context) - room:] if len(context) > room else context


def _pad(rows: Sequence[list[int]], pad_id: int, device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [batch, len] and segment ids (1 real, 0 padding)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    segments = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        segments[i, : len(r)] = 1
    return ids.to(device), segments.to(device)


def _decoder_batch(model, pairs, start: int, pad_id: int, device) -> tuple[torch.Tensor, list]:
    """Logits [batch, len, vocab] and, per row, the positions and labels to score."""
    rows, targets = [], []
    for context, continuation in pairs:
        sequence = context + continuation
        rows.append([start] + sequence[:-1])
        targets.append((len(context), continuation))
    tokens, segments = _pad(rows, pad_id, device)
    prefix = torch.tensor([len(c) + 1 for c, _ in pairs], dtype=torch.long, device=device)
    logits = model(tokens=tokens, segment_ids=segments, prefix_len=prefix)
    return logits, targets


def _encoder_decoder_batch(model, pairs, start: int, pad_id: int, device
                           ) -> tuple[torch.Tensor, list]:
    encoder, encoder_segments = _pad([c for c, _ in pairs], pad_id, device)
    decoder, decoder_segments = _pad([[start] + t[:-1] for _, t in pairs], pad_id, device)
    logits = model(encoder_tokens=encoder, decoder_tokens=decoder,
                   encoder_segment_ids=encoder_segments, decoder_segment_ids=decoder_segments)
    return logits, [(0, t) for _, t in pairs]


def _label_logprobs(logits: torch.Tensor, targets: list[tuple[int, list[int]]]
                    ) -> tuple[list[float], list[bool]]:
    """Per row: the summed log-probability of its labels and whether each is the argmax.

    ``logits`` [batch, len, V]; ``targets[row] = (first position, labels)``. Computed as
    logit[label] - logsumexp, without a second [batch, len, V] tensor.
    """
    batch, length, _ = logits.shape
    labels = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, (first, ids) in enumerate(targets):
        labels[row, first : first + len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, first : first + len(ids)] = True
    labels, mask = labels.to(logits.device), mask.to(logits.device)
    logits = logits.float()
    picked = logits.gather(-1, labels[..., None])[..., 0]  # [batch, len]
    logprobs = (picked - torch.logsumexp(logits, dim=-1)).double() * mask
    greedy = ((logits.argmax(-1) == labels) | ~mask).all(dim=-1)  # [batch]
    return logprobs.sum(dim=-1).tolist(), greedy.tolist()


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    vocab_size: int,
    start_id: int,
    pad_id: int,
    max_len: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[ContinuationScore]:
    """The :class:`ContinuationScore` of each (context ids, continuation ids) pair, in order.

    Args:
        model: a :class:`~megarch.model.DecoderLM` or :class:`~megarch.model.EncoderDecoderLM`.
        pairs: token ids; every continuation non-empty (the encoder-decoder's contexts too).
        vocab_size: the tokenizer's vocabulary; logits of higher ids are left out.
        start_id: the first decoder input (:func:`start_id`); pad_id: the padding id.
        max_len: the longest input (module docstring); None: no limit.
        batch_size: pairs per forward pass (longest first, to pad little).
        progress: show a progress bar (tqdm) over the batches.
    """
    if model.training:
        log.warning("scoring with a model in training mode (dropout on); call model.eval()")
    encoder_decoder = isinstance(model, EncoderDecoderLM)
    prepared = []
    for i, (context, continuation) in enumerate(pairs):
        context, continuation = list(context), list(continuation)
        if not continuation or (encoder_decoder and not context):
            raise ValueError(f"pair {i}: empty {'continuation' if not continuation else 'context'}"
                             " (the encoder-decoder needs a context, every model a continuation)")
        prepared.append((truncate_context(context, continuation, max_len, encoder_decoder),
                         continuation))
    order = sorted(range(len(prepared)), key=lambda i: -sum(map(len, prepared[i])))
    device = next(model.parameters()).device
    run_batch = _encoder_decoder_batch if encoder_decoder else _decoder_batch
    scores: list[ContinuationScore | None] = [None] * len(prepared)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="scoring", unit="batch", leave=False)
    for start in starts:
        chunk = order[start : start + batch_size]
        logits, targets = run_batch(model, [prepared[i] for i in chunk], start_id, pad_id,
                                    device)
        totals, greedy = _label_logprobs(logits[..., :vocab_size], targets)
        for i, total, is_greedy, (_, labels) in zip(chunk, totals, greedy, targets, strict=True):
            scores[i] = ContinuationScore(logprob=total, n_tokens=len(labels), greedy=is_greedy)
    return scores  # type: ignore[return-value]
