#!/usr/bin/env python3
"""Generation benchmark: incremental decoding (key/value cache) against rerunning the sequence.

For each architecture, a tiny random model (the ``*_tiny`` preset, untied output projection)
generates greedily from the same batch of prompts of unequal lengths, once with the cache
(``GenerationOptions(use_cache=True)``, the default) and once without, on CPU. The EOS output
row is zeroed so that no row stops early and both runs produce ``--batch x --new-tokens``
tokens; the two outputs must be identical. Prints generated tokens/s of each (best of
``--trials``, interleaved) and their ratio.

Usage: python tools/bench_generation.py [--archs causal_decoder nonc_decoder encoder_decoder]
       [--batch 8] [--prompt-len 48] [--new-tokens 64] [--trials 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

ARCHS = ("causal_decoder", "nonc_decoder", "encoder_decoder")


def tiny_untied(arch: str, seed: int = 0) -> torch.nn.Module:
    """The tiny preset of ``arch`` with an untied output whose EOS row is zero (eval mode)."""
    from megarch.config.presets import tiny_model
    from megarch.model import build_model

    cfg = tiny_model(arch)
    cfg.tie_embeddings = False  # a tied random model mostly repeats its last input token
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def prompts_of(batch: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``batch`` random prompts, lengths spread from ``longest // 4`` to ``longest``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(max(1, longest // 4), longest, batch).round().long().tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def timed(model, tokenizer, prompts, opts) -> tuple[list[list[int]], float]:
    """The generated ids and the generated tokens per second."""
    from megarch.eval.generation import generate

    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, opts)
    seconds = time.perf_counter() - start
    return out, sum(len(o) for o in out) / seconds


def main() -> None:
    """Time both ways per architecture and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48, help="the longest prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from megarch.data.tokenizers import load_tokenizer
    from megarch.eval.generation import GenerationOptions

    tokenizer = load_tokenizer("bytes")
    prompts = prompts_of(args.batch, args.prompt_len, tokenizer.vocab_size)
    print(f"{args.batch} prompts of {len(prompts[0])}-{len(prompts[-1])} tokens, "
          f"{args.new_tokens} new tokens each, greedy, {torch.get_num_threads()} thread(s), "
          f"best of {args.trials}")
    print(f"{'architecture':<18}{'no cache tok/s':>16}{'cache tok/s':>14}{'ratio':>9}")
    for arch in args.archs:
        model = tiny_untied(arch)
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_id] = 0.0  # EOS never wins: no early stop
        rates: dict[bool, list[float]] = {True: [], False: []}
        outputs = {}
        for _ in range(args.trials):
            for use_cache in (False, True):
                opts = GenerationOptions(max_new_tokens=args.new_tokens, use_cache=use_cache)
                outputs[use_cache], rate = timed(model, tokenizer, prompts, opts)
                rates[use_cache].append(rate)
        if outputs[True] != outputs[False]:
            raise SystemExit(f"{arch}: the cached and uncached outputs differ (a bug: report it)")
        full, cached = max(rates[False]), max(rates[True])
        print(f"{arch:<18}{full:>16,.0f}{cached:>14,.0f}{cached / full:>8.2f}x")


if __name__ == "__main__":
    main()
