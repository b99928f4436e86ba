"""Text generation: greedy or sampled (temperature, top-k), batched, stopping at EOS.

Inputs follow the training samples, as rank classification does (:mod:`megarch.eval.scoring`):

- decoder-only: ``[START, prompt (, EOS)]`` then the generated tokens (START is BOS or EOS,
  :func:`megarch.eval.scoring.run_format`); for the non-causal decoder that whole start is the
  bidirectional prefix (``prefix_len = len(prompt) + 1 (+1)``), generated tokens are causal;
- encoder-decoder: the prompt (+ EOS) to the encoder (encoded once), ``[BOS]`` then the
  generated tokens to the decoder.

By default decoding is incremental (:class:`megarch.model.KVCache`): one prefill pass over the
prompts (ND: with the same bidirectional prefix), then each step feeds only the newest token of
every row at its own position. ``use_cache=False`` instead reruns the model on the whole
sequence each step (quadratic in the output length; the reference the cache is tested
against). Both give the same tokens: batched prompts are right-padded (segment id 0), and each
row's next token goes right after its own last one. Ids >= the tokenizer's vocabulary (the
model's padding rows) are never produced. A row stops at EOS (included in its output) or
after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megarch.data.tokenizers import Tokenizer
from megarch.eval.scoring import run_format, start_id
from megarch.model import EncoderDecoderLM, KVCache

LogitsHook = Callable[[torch.Tensor], None]


@dataclass
class GenerationOptions:
    """How to pick the next token and when to stop."""

    max_new_tokens: int = 32
    """Most tokens generated per prompt (EOS included)."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sampling only: keep the k most likely tokens (0: all)."""
    prompt_eos: bool = True
    """Append EOS to the prompt (T5-style training inputs end with EOS)."""
    decoder_start: str = "bos"
    """Decoder-only models: the token before the prompt, bos or eos (encoder-decoders: BOS)."""
    max_len: int | None = None
    """Prompts are cut from the left so that prompt + output fit (decoder) / the prompt fits
    (encoder-decoder); None: no limit."""
    use_cache: bool = True
    """Incremental decoding with a key/value cache; False: rerun the whole sequence each step."""

    @classmethod
    def for_run(cls, config, **overrides) -> GenerationOptions:
        """Options consistent with the training samples of ``config`` (a TrainConfig);
        ``overrides`` (None values ignored) win."""
        run = run_format(config)
        values = {"prompt_eos": run["prompt_eos"], "decoder_start": run["decoder_start"]}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def next_token(logits: torch.Tensor, vocab_size: int, temperature: float = 0.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids [batch] from last-position logits [batch, vocab] (ids < ``vocab_size`` only)."""
    logits = logits[:, :vocab_size].float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [batch, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _truncated(prompt: list[int], room: int | None) -> list[int]:
    if room is None or len(prompt) <= room:
        return prompt
    if room < 1:
        raise ValueError(f"max_len leaves no room for the prompt ({room} tokens)")
    return prompt[len(prompt) - room:]


def _decoder_generate(model, starts: list[list[int]], tok: Tokenizer, opts: GenerationOptions,
                      generator, on_logits: LogitsHook | None) -> list[list[int]]:
    device = next(model.parameters()).device
    batch, longest = len(starts), max(len(s) for s in starts)
    tokens = torch.full((batch, longest + opts.max_new_tokens), tok.pad_id, dtype=torch.long,
                        device=device)
    for i, s in enumerate(starts):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in starts], device=device)
    prefix = lengths.clone()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    cache = KVCache(tokens.shape[1]) if opts.use_cache else None
    for step in range(opts.max_new_tokens):
        if cache is not None and step > 0:
            # Each row's newest token at its own position; a finished row repeats its last
            # one (same slot, same keys/values), its output ignored.
            positions = (lengths - 1)[:, None]  # [batch, 1]
            last = model(tokens=tokens[rows[:, None], positions], positions=positions,
                         cache=cache)[:, -1]
        else:
            width = int(lengths.max())
            positions = torch.arange(width, device=device).expand(batch, width)
            segments = (positions < lengths[:, None]).long()
            extra = {} if cache is None else {"cache": cache}
            logits = model(tokens=tokens[:, :width], positions=positions, segment_ids=segments,
                           prefix_len=prefix, **extra)
            last = logits[rows, lengths - 1]  # [batch, vocab]
        if on_logits is not None:
            on_logits(last)
        chosen = next_token(last, tok.vocab_size, opts.temperature, opts.top_k, generator)
        active = ~done
        tokens[rows[active], lengths[active]] = chosen[active]
        lengths = lengths + active.long()
        done = done | (active & (chosen == tok.eos_id))
        if bool(done.all()):
            break
    return [tokens[i, len(s) : int(lengths[i])].tolist() for i, s in enumerate(starts)]


def _encoder_decoder_generate(model, prompts: list[list[int]], tok: Tokenizer,
                              opts: GenerationOptions, generator,
                              on_logits: LogitsHook | None) -> list[list[int]]:
    device = next(model.parameters()).device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    encoder = torch.full((batch, longest), tok.pad_id, dtype=torch.long, device=device)
    encoder_segments = torch.zeros_like(encoder)
    for i, p in enumerate(prompts):
        encoder[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        encoder_segments[i, : len(p)] = 1
    encoder_out = model.encode(encoder, encoder_segment_ids=encoder_segments)
    decoder = torch.full((batch, 1), tok.bos_id, dtype=torch.long, device=device)
    cache = KVCache(opts.max_new_tokens) if opts.use_cache else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in range(opts.max_new_tokens):
        # Every row has the same decoder length; finished rows go on, their output ignored.
        if cache is not None and step > 0:
            positions = torch.full((batch, 1), step, dtype=torch.long, device=device)
            last = model.decode(decoder[:, -1:], encoder_out, decoder_positions=positions,
                                encoder_segment_ids=encoder_segments, cache=cache)[:, -1]
        else:
            positions = torch.arange(step + 1, device=device).expand(batch, step + 1)
            extra = {} if cache is None else {"cache": cache}
            last = model.decode(decoder, encoder_out, decoder_positions=positions,
                                encoder_segment_ids=encoder_segments, **extra)[:, -1]
        if on_logits is not None:
            on_logits(last)
        chosen = next_token(last, tok.vocab_size, opts.temperature, opts.top_k, generator)
        for i in torch.nonzero(~done)[:, 0].tolist():
            outputs[i].append(int(chosen[i]))
        done = done | (chosen == tok.eos_id)
        if bool(done.all()):
            break
        decoder = torch.cat([decoder, chosen[:, None]], dim=1)
    return outputs


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
             options: GenerationOptions | None = None,
             generator: torch.Generator | None = None,
             on_logits: LogitsHook | None = None) -> list[list[int]]:
    """Generated ids for each prompt's ids (EOS last when the row stopped at it).

    ``generator`` (on the model's device) seeds sampling (torch.multinomial); greedy
    decoding ignores it. ``on_logits``, if given, sees each step's next-token logits
    [batch, vocab] (float32, every row, finished ones too) before a token is picked. Pass
    the model in eval mode.
    """
    opts = options or GenerationOptions()
    if opts.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={opts.max_new_tokens}: must be >= 1")
    if not prompts:
        return []
    eos = [tokenizer.eos_id] if opts.prompt_eos else []
    if isinstance(model, EncoderDecoderLM):
        rows = [_truncated(list(p) + eos, opts.max_len) for p in prompts]
        if any(not r for r in rows):
            raise ValueError("the encoder-decoder needs a non-empty prompt (or prompt_eos)")
        return _encoder_decoder_generate(model, rows, tokenizer, opts, generator, on_logits)
    room = None if opts.max_len is None else opts.max_len - 1 - opts.max_new_tokens
    first = start_id(model, tokenizer, opts.decoder_start)
    starts = [[first] + _truncated(list(p) + eos, room) for p in prompts]
    return _decoder_generate(model, starts, tokenizer, opts, generator, on_logits)


def generate_text(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str],
                  options: GenerationOptions | None = None,
                  generator: torch.Generator | None = None) -> list[str]:
    """Generated text for each prompt (special tokens, EOS included, left out)."""
    ids = generate(model, tokenizer, [tokenizer.encode(p) for p in prompts], options, generator)
    return [tokenizer.decode(i, show_special=False) for i in ids]
