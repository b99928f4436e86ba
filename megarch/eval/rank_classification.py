"""Zero-shot rank classification (PAPER.md, "Zero-shot evaluation").

For every example, every prompt and every answer choice, the model scores
``log p(choice | prompt)``, summed over the choice's tokens; the prediction is the argmax.
The length-normalised variant takes the mean per token instead. The prompt goes to the encoder
(encoder-decoder) or is the bidirectional prefix (non-causal decoder) or the preceding text
(causal decoder); the choice goes to the decoder / after it (see :mod:`megarch.eval.scoring`).

EOS handling follows the run's training samples (:func:`megarch.eval.scoring.run_format`;
:meth:`RankOptions.for_run`):

- MLM / multitask runs (T5's inputs and targets, each ending with EOS; the study's seqio tasks
  append EOS to both): the prompt ends with EOS, decoder-only sequences start with BOS;
- FLM / PLM runs (rows cut from documents + EOS): the prompt starts a document (decoder-only
  sequences start with EOS, the end of the previous one) and the choice follows it directly.

In both, the choice ends with EOS and that EOS is scored (the model must also say the answer
is complete). ``RankOptions()`` is the T5 convention; ``prompt_eos=False, choice_eos=False``
scores the bare choice after the bare prompt (the lm-evaluation-harness convention).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from megarch.data.tokenizers import Tokenizer
from megarch.eval.scoring import ContinuationScore, run_format, score_continuations, start_id
from megarch.eval.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class RankOptions:
    """How prompts and choices become model inputs."""

    prompt_eos: bool = True
    """Append EOS to the prompt (training inputs end with EOS)."""
    choice_eos: bool = True
    """Append EOS to the choice and score it (training targets end with EOS)."""
    decoder_start: str = "bos"
    """Decoder-only models: the token before the prompt, bos or eos (encoder-decoders: BOS)."""
    max_len: int | None = None
    """Decoder: the longest [prompt ; choice]; encoder-decoder: the longest prompt. Prompts are
    cut from the left to fit. None: no limit (:func:`default_max_len` gives the run's)."""
    batch_size: int = 16
    """(prompt, choice) pairs per forward pass."""
    progress: bool = False
    """Show a progress bar while scoring."""

    @classmethod
    def for_run(cls, config, **overrides) -> RankOptions:
        """Options consistent with the training samples of ``config`` (a TrainConfig), with
        ``max_len`` = :func:`default_max_len`; ``overrides`` (None values ignored) win."""
        values = {**run_format(config), "max_len": default_max_len(config)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def default_max_len(config) -> int:
    """The longest input a run trained on: ``data.seq_len`` (decoder rows; MLM / PLM inputs),
    or the multitask ``inputs_len (+ targets_len for decoders)``."""
    data = config.data
    if data.objective == "multitask":
        if config.model.is_encoder_decoder:
            return data.inputs_len
        return data.inputs_len + data.targets_len
    return data.seq_len


def encode_pair(tokenizer: Tokenizer, prompt: str, choice: str, prompt_eos: bool = True,
                choice_eos: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a prompt and a choice (module docstring on EOS)."""
    context = tokenizer.encode(prompt) + ([tokenizer.eos_id] if prompt_eos else [])
    continuation = tokenizer.encode(choice) + ([tokenizer.eos_id] if choice_eos else [])
    if not continuation:
        raise ValueError(f"choice {choice!r} encodes to no tokens; give it text or choice_eos")
    return context, continuation


@dataclass
class TaskScores:
    """Scores of every (example, prompt, choice) of one task, and what they predict."""

    task: str
    """The task's name."""
    labels: list[int]
    """The correct choice of each example."""
    scores: list[list[list[ContinuationScore]]] = field(default_factory=list)
    """``scores[k][i][c]``: prompt ``k``, example ``i``, choice ``c``."""

    def predictions(self, normalize: bool = False) -> list[list[int]]:
        """``[k][i]``: the argmax choice (by mean log-prob per token when ``normalize``)."""
        def key(s: ContinuationScore) -> float:
            return s.mean_logprob if normalize else s.logprob

        return [[max(range(len(choices)), key=lambda c, cs=choices: key(cs[c]))
                 for choices in per_prompt] for per_prompt in self.scores]

    def prompt_accuracies(self, normalize: bool = False) -> list[float]:
        """Accuracy of each prompt over the task's examples."""
        return [
            sum(p == y for p, y in zip(preds, self.labels, strict=True)) / len(self.labels)
            for preds in self.predictions(normalize)
        ]


def rank_classify(model: torch.nn.Module, tokenizer: Tokenizer, task: Task,
                  options: RankOptions | None = None) -> TaskScores:
    """Score every choice of every example under every prompt of ``task`` (batched)."""
    options = options or RankOptions()
    pairs: list[tuple[list[int], list[int]]] = []
    index: list[tuple[int, int, int]] = []
    for i, example in enumerate(task.examples):
        for k, prompt in enumerate(example.prompts):
            for c, choice in enumerate(example.choices[k]):
                pairs.append(encode_pair(tokenizer, prompt, choice, options.prompt_eos,
                                         options.choice_eos))
                index.append((k, i, c))
    flat = score_continuations(
        model, pairs, vocab_size=tokenizer.vocab_size,
        start_id=start_id(model, tokenizer, options.decoder_start),
        pad_id=tokenizer.pad_id, max_len=options.max_len, batch_size=options.batch_size,
        progress=options.progress,
    )
    n_choices = len(task.examples[0].choices[0]) if task.examples else 0
    scores = [[[None] * len(ex.choices[k]) for ex in task.examples]
              for k in range(task.n_prompts)]
    for (k, i, c), score in zip(index, flat, strict=True):
        scores[k][i][c] = score
    log.info("%s: scored %d examples x %d prompts x %d choices", task.name, len(task.examples),
             task.n_prompts, n_choices)
    return TaskScores(task=task.name, labels=[ex.label for ex in task.examples], scores=scores)
