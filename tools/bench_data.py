#!/usr/bin/env python3
"""Data-path benchmark: preprocessing throughput and sample-building throughput.

Prints, side by side in one run on the embedded corpus (repeated to a useful size):

1. preprocessing tokens/s with ``megarch-data preprocess`` at 1 and 2 workers against a plain
   single-process loop over megatron-core's ``IndexedDatasetBuilder`` with the same
   SentencePiece tokenizer (the baseline), and the 2-worker / 1-worker scaling;
2. samples/s and tokens/s for each sample builder, in one process (so per core).

The baseline needs megatron-core, the ``megatron`` extra: ``pip install -e ".[megatron]"``.

Usage: python tools/bench_data.py [--dir /tmp/megarch-bench] [--repeat 8] [--samples 3000]
       [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings

import numpy as np


def prepare(work: str, repeat: int) -> tuple[str, str, str]:
    """The corpus repeated ``repeat`` times, a tokenizer trained on it, and a prompted file."""
    from megarch.data.corpus import build_stdlib_corpus
    from megarch.data.tokenizers import train_sentencepiece

    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "stdlib.jsonl")
    if not os.path.exists(corpus):
        build_stdlib_corpus(corpus, progress=False)
    model = os.path.join(work, "sp.model")
    if not os.path.exists(model):
        train_sentencepiece([corpus], model[:-6], vocab_size=8000, progress=False)
    big = os.path.join(work, f"stdlib_x{repeat}.jsonl")
    prompted = os.path.join(work, "prompted.jsonl")
    if not os.path.exists(big):
        with open(corpus, encoding="utf-8") as f:
            lines = f.readlines()
        with open(big, "w", encoding="utf-8") as f:
            for _ in range(repeat):
                f.writelines(lines)
        with open(prompted, "w", encoding="utf-8") as f:
            for line in lines:
                text = json.loads(line)["text"]
                first, _, rest = text.partition(".")
                f.write(json.dumps({"inputs": "Explain: " + rest.strip(), "targets": first}) + "\n")
    return big, model, prompted


def megatron_baseline(path: str, model: str, out: str) -> tuple[int, float]:
    """A plain loop: json parse, SentencePiece encode, IndexedDatasetBuilder.add_document."""
    import sentencepiece
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint16)
    tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
            builder.add_document(torch.tensor(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(out + ".idx")
    return tokens, time.perf_counter() - started


def bench_preprocess(
    big: str, model: str, work: str, trials: int
) -> list[tuple[str, float, float]]:
    """Best of ``trials`` runs each (other load on the machine only ever slows a run down)."""
    from megarch.data.preprocess import preprocess

    def megarch_rate(workers: int) -> float:
        summary = preprocess([big], os.path.join(work, f"w{workers}"), model, workers=workers,
                             progress=False)
        return sum(summary.tokens.values()) / summary.seconds

    def baseline_rate() -> float:
        tokens, seconds = megatron_baseline(big, model, os.path.join(work, "baseline"))
        return tokens / seconds

    rates = {name: 0.0 for name in ("baseline", 1, 2)}
    for _ in range(trials):  # interleaved, so a burst of load hits every variant alike
        rates["baseline"] = max(rates["baseline"], baseline_rate())
        for workers in (1, 2):
            rates[workers] = max(rates[workers], megarch_rate(workers))
    base = rates["baseline"]
    rows = [("megatron-core IndexedDatasetBuilder loop", base, 1.0)]
    for workers in (1, 2):
        rows.append((f"megarch preprocess, {workers} worker(s)", rates[workers],
                     rates[workers] / base))
    return rows


BUILDERS = (
    ("flm", "decoder"),
    ("plm", "decoder"),
    ("plm", "encoder_decoder"),
    ("mlm", "decoder"),
    ("mlm", "encoder_decoder"),
    ("multitask", "decoder"),
    ("multitask", "encoder_decoder"),
)


def bench_samples(work: str, model: str, prompted: str, n: int) -> list[tuple[str, float, float]]:
    from megarch.config.data import DataConfig
    from megarch.data.datasets import build_dataset
    from megarch.data.preprocess import preprocess
    from megarch.data.tokenizers import load_tokenizer

    prompted_prefix = os.path.join(work, "prompted")
    if not os.path.exists(prompted_prefix + "_inputs_document.idx"):
        preprocess([prompted], prompted_prefix, model, json_keys=("inputs", "targets"),
                   progress=False)
    tokenizer = load_tokenizer(model)
    rows = []
    for objective, layout in BUILDERS:
        path = prompted_prefix if objective == "multitask" else os.path.join(work, "w1")
        cfg = DataConfig(paths=[path], tokenizer=model, objective=objective, layout=layout,
                         split="1", cache_dir=os.path.join(work, "cache"))
        dataset = build_dataset(cfg, tokenizer, "train", n)
        dataset[0]
        started = time.perf_counter()
        tokens = 0
        for i in range(n):
            sample = dataset[i]
            tokens += sum(v.numel() for k, v in sample.items() if k.endswith("tokens"))
        seconds = time.perf_counter() - started
        rows.append((f"{objective} / {layout}", n / seconds, tokens / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/megarch-bench")
    parser.add_argument("--repeat", type=int, default=8, help="copies of the corpus to tokenize")
    parser.add_argument("--samples", type=int, default=3000, help="samples per builder")
    parser.add_argument("--trials", type=int, default=3, help="preprocessing runs, best kept")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its apex / Transformer Engine notices
            import megatron.core.datasets.indexed_dataset  # noqa: F401
    except ImportError:
        parser.exit(2, "bench_data.py: error: the baseline needs megatron-core, which is not "
                    "installed: pip install -e '.[megatron]' (or pip install megatron-core)\n")
    torch_threads = os.environ.get("OMP_NUM_THREADS", "default")
    try:
        big, model, prompted = prepare(args.dir, args.repeat)
        print(f"cores: {os.cpu_count()}, torch threads: {torch_threads}, input: {big} "
              f"({os.path.getsize(big) / 1e6:.1f} MB), tokenizer: {model}\n")
        print(f"{'preprocessing':<44} {'tokens/s':>12} {'vs baseline':>12}")
        pre = bench_preprocess(big, model, args.dir, args.trials)
        for name, rate, ratio in pre:
            print(f"{name:<44} {rate:>12,.0f} {ratio:>11.2f}x")
        print(f"{'2 workers / 1 worker':<44} {'':>12} {pre[2][1] / pre[1][1]:>11.2f}x\n")
        print(f"{'sample builder (one process)':<44} {'samples/s':>12} {'tokens/s':>12}")
        for name, samples, tokens in bench_samples(args.dir, model, prompted, args.samples):
            print(f"{name:<44} {samples:>12,.0f} {tokens:>12,.0f}")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
