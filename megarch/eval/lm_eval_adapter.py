"""A megarch checkpoint as an EleutherAI lm-evaluation-harness model, named ``megarch``.

Optional: needs ``lm-eval`` (``pip install 'megarch[lm-eval]'``); megarch imports without it.
Installing megarch makes the stock harness command know it (a ``.pth`` start-up hook,
:mod:`megarch.lm_eval_plugin`; lm-eval 0.4 has no plugin discovery of its own)::

    lm_eval --model megarch --model_args checkpoint=runs/cd_flm_tiny \\
        --tasks hellaswag --batch_size 16

``megarch-lm-eval`` (or ``python -m megarch.eval.lm_eval_adapter``) is the same command line
with the model imported first, for a Python that skips the hook (``python -S``, or a source
tree used through PYTHONPATH without installing); from Python:
``import megarch.eval.lm_eval_adapter``, then
``lm_eval.simple_evaluate(model="megarch", model_args="checkpoint=PATH", ...)``.

``--model_args``: ``checkpoint`` (a checkpoint or a run's out_dir, required), ``device``
(default auto), ``tokenizer`` (overrides the run's), ``max_length`` (default the run's
training length), ``prompt_eos`` and ``decoder_start`` (default: as the run's training samples,
:func:`megarch.eval.scoring.run_format`) and ``choice_eos`` (default false: continuations are
scored as given, the harness convention).

The requests go through megarch-eval's own code (:func:`megarch.eval.scoring.
score_continuations`, :func:`megarch.eval.generation.generate`), so a (context, continuation)
pair gets the same log-likelihood here as in ``megarch-eval`` with the same EOS options.
``loglikelihood_rolling`` scores a text's tokens (no EOS added at its end) as continuations
of its own preceding tokens, in windows of at most ``max_length`` tokens that each see up to
half a window of earlier text; a context is handled as in ``loglikelihood`` (EOS appended with
``prompt_eos``; the first window's context is empty, or just EOS).
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megarch.eval.generation import GenerationOptions, generate
from megarch.eval.loading import load_for_eval
from megarch.eval.rank_classification import RankOptions
from megarch.eval.scoring import score_continuations, start_id
from megarch.lm_eval_plugin import MODEL_NAME

log = logging.getLogger(__name__)


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_batch_size(value: object) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 16
    return max(1, int(value))


def rolling_windows(ids: list[int], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows covering every id of ``ids`` exactly once.

    Each continuation has at most ``max_length // 2`` ids (all of them without a limit) and its
    context the ids just before it, at most ``max_length`` - that many.
    """
    if max_length is None or len(ids) <= max_length:
        return [([], ids)] if ids else []
    stride = max(1, max_length // 2)
    return [(ids[max(0, s - (max_length - stride)) : s], ids[s : s + stride])
            for s in range(0, len(ids), stride)]


class MegarchLM(LM):
    """The lm-evaluation-harness model over a megarch checkpoint (module docstring)."""

    def __init__(self, checkpoint: str, device: str | None = None, tokenizer: str | None = None,
                 max_length: int | str | None = None, prompt_eos: object = None,
                 choice_eos: object = False, decoder_start: str | None = None,
                 batch_size: object = 16, max_batch_size: object = None,
                 **unused: object) -> None:
        super().__init__()
        if unused:
            log.warning("megarch model: ignoring unknown model_args %s", sorted(unused))
        import torch

        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("megarch model: device %s is not available (the harness defaults to "
                        "cuda); using cpu", device)
            device = "cpu"
        self.model, self.config, self.tok = load_for_eval(checkpoint, device, tokenizer)
        self.options = RankOptions.for_run(
            self.config, max_len=int(max_length) if max_length else None,
            prompt_eos=None if prompt_eos is None else _as_bool(prompt_eos),
            choice_eos=_as_bool(choice_eos), decoder_start=decoder_start,
            batch_size=_as_batch_size(batch_size),
        )
        self.max_length = self.options.max_len
        self.prompt_eos, self.choice_eos = self.options.prompt_eos, self.options.choice_eos
        self.batch_size = self.options.batch_size
        self.start_id = start_id(self.model, self.tok, self.options.decoder_start)

    def _with_eos(self, context: list[int]) -> list[int]:
        """``context`` + EOS when ``prompt_eos`` (or when empty for the encoder-decoder, whose
        encoder needs an input: T5 encodes an empty text as EOS)."""
        if self.prompt_eos or (not context and self.config.model.is_encoder_decoder):
            return context + [self.tok.eos_id]
        return context

    def _score(self, pairs: list[tuple[list[int], list[int]]], progress: bool) -> list:
        return score_continuations(
            self.model, pairs, vocab_size=self.tok.vocab_size, start_id=self.start_id,
            pad_id=self.tok.pad_id, max_len=self.max_length, batch_size=self.batch_size,
            progress=progress,
        )

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy output) per request."""
        pairs, places = [], []
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # empty: log 1
        for index, request in enumerate(requests):
            context, continuation = request.args[0], request.args[1]
            ids = self.tok.encode(continuation) + ([self.tok.eos_id] if self.choice_eos else [])
            if ids:
                pairs.append((self._with_eos(self.tok.encode(context)), ids))
                places.append(index)
        for index, score in zip(places, self._score(pairs, not disable_tqdm), strict=True):
            results[index] = (score.logprob, score.greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text (see :func:`rolling_windows`)."""
        pairs, owner = [], []
        for index, request in enumerate(requests):
            ids = self.tok.encode(request.args[0])
            room = self.max_length - 1  # one for the EOS a context may end with
            for context, continuation in rolling_windows(ids, room):
                pairs.append((self._with_eos(context), continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, score in zip(owner, self._score(pairs, not disable_tqdm), strict=True):
            totals[index] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text per request, cut at the first of its ``until`` strings (greedy
        unless ``do_sample``; ``max_gen_toks`` capped at half of ``max_length``)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            kwargs = dict(request.args[1]) if len(request.args) > 1 else {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = _as_bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 0.0)) if sample else 0.0
            key = (int(kwargs.get("max_gen_toks", 256)), temperature, tuple(until))
            groups[key].append(index)
        outputs = [""] * len(requests)
        for (max_new, temperature, until), indices in groups.items():
            if max_new <= 0:  # nothing to generate: the empty string
                continue
            if max_new > self.max_length // 2:  # leave the prompt half of the window at least
                log.warning("max_gen_toks=%d capped to %d (max_length %d)", max_new,
                            self.max_length // 2, self.max_length)
                max_new = max(1, self.max_length // 2)
            options = GenerationOptions(max_new_tokens=max_new, temperature=temperature,
                                        prompt_eos=self.prompt_eos, max_len=self.max_length,
                                        decoder_start=self.options.decoder_start)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [self.tok.encode(requests[i].args[0]) for i in chunk]
                if self.config.model.is_encoder_decoder and not self.prompt_eos:
                    prompts = [p or [self.tok.eos_id] for p in prompts]  # as _with_eos
                for i, ids in zip(chunk, generate(self.model, self.tok, prompts, options),
                                  strict=True):
                    text = self.tok.decode(ids, show_special=False)
                    cuts = [text.find(stop) for stop in until if stop and stop in text]
                    outputs[i] = text[: min(cuts)] if cuts else text
        return outputs


if __name__ != "__main__":  # under ``python -m`` main() imports this module by its own name
    register_model(MODEL_NAME)(MegarchLM)  # replaces the plugin's placeholder, if there is one


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``megarch`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    import megarch.eval.lm_eval_adapter  # noqa: F401  (registers MegarchLM under its name)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
