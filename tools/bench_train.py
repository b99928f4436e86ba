#!/usr/bin/env python3
"""Training-loop benchmark: megarch's Trainer against a plain PyTorch loop, same run, same CPU.

Both train the same model (same preset, seed and batches) with AdamW. The plain loop does only
forward, loss, backward and the optimizer step over pre-loaded batches; the Trainer adds what a
real run needs (data loading, loss-token normalisation over the global batch, gradient-norm and
non-finite checks, clipping, the schedule, deterministic algorithms, metrics). Prints tokens/s of
each (best of ``--trials``, the first ``--warmup`` steps excluded) and their ratio (target: the
Trainer within 10% of the plain loop).

Usage: python tools/bench_train.py [--preset cd_flm_tiny] [--dir data] [--steps 30]
       [--warmup 5] [--trials 2] [--threads 1] [--model.n_layers 4 ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def _config(args: argparse.Namespace, overrides: list[str], out_dir: str):
    from megarch.config.overrides import apply_overrides
    from megarch.config.train import get_train_preset

    cfg = get_train_preset(args.preset)
    cfg.data.paths = [os.path.join(args.dir, "stdlib")]
    cfg.data.tokenizer = os.path.join(args.dir, "stdlib_sp.model")
    cfg.run.steps, cfg.run.out_dir, cfg.run.resume = args.steps, out_dir, "none"
    cfg.run.eval_batches, cfg.run.save_every, cfg.run.log_every = 0, 0, 10**9
    apply_overrides(cfg, overrides)
    return cfg


def framework_tokens_per_s(cfg, warmup: int) -> float:
    """Tokens/s of :class:`megarch.training.Trainer` over steps after ``warmup``."""
    from megarch.training import Trainer, read_metrics

    Trainer(cfg).train()
    records = read_metrics(cfg.run.out_dir)
    step_tokens = records[0]["tokens_seen"]  # every step sees one global batch
    seconds = sum(step_tokens / r["tokens_per_s"] for r in records[warmup:])
    return step_tokens * len(records[warmup:]) / seconds


def plain_tokens_per_s(cfg, warmup: int) -> float:
    """Tokens/s of a plain loop: forward, loss, backward, AdamW step, on pre-loaded batches."""
    from megarch.data.datasets import build_dataset
    from megarch.data.loader import make_loader
    from megarch.data.tokenizers import load_tokenizer
    from megarch.model import build_model, lm_loss

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg.validate(tokenizer_vocab=tokenizer.vocab_size)
    run = cfg.run
    dataset = build_dataset(cfg.data, tokenizer, "train", run.steps * run.global_batch)
    micro = list(make_loader(dataset, run.micro_batch, run.global_batch, num_workers=0))
    accumulation = run.global_batch // run.micro_batch
    torch.manual_seed(run.seed)
    model = build_model(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), weight_decay=0.0)
    labels_key = "decoder_labels" if cfg.model.is_encoder_decoder else "labels"
    mask_key = "decoder_loss_mask" if cfg.model.is_encoder_decoder else "loss_mask"
    tokens = seconds = 0.0
    for step in range(run.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batches = micro[step * accumulation:(step + 1) * accumulation]
        for batch in batches:
            out = lm_loss(model(**batch), batch[labels_key], batch[mask_key], cfg.model.z_loss)
            (out["loss"] / accumulation).backward()
        optimizer.step()
        if step >= warmup:
            seconds += time.perf_counter() - start
            tokens += sum(sum(v.numel() for k, v in b.items() if k.endswith("tokens"))
                          for b in batches)
    return tokens / seconds


def main() -> None:
    """Run both loops ``--trials`` times, interleaved, and print the best of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cd_flm_tiny")
    parser.add_argument("--dir", default="data", help="the embedded corpus (built if missing)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args, overrides = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from megarch.data.embedded import is_prepared, prepare_embedded

    if not is_prepared(args.dir):
        prepare_embedded(args.dir, progress=True)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            out_dir = os.path.join(tmp, f"run{trial}")
            ours.append(framework_tokens_per_s(_config(args, overrides, out_dir), args.warmup))
            plain.append(plain_tokens_per_s(_config(args, overrides, out_dir), args.warmup))
            print(f"trial {trial}: megarch {ours[-1]:,.0f} tok/s, plain {plain[-1]:,.0f} tok/s")
    best, baseline = max(ours), max(plain)
    print(f"{args.preset} on {torch.get_num_threads()} threads, {args.steps} steps "
          f"({args.warmup} warm-up): megarch {best:,.0f} tok/s | plain PyTorch "
          f"{baseline:,.0f} tok/s | ratio {best / baseline:.3f}")


if __name__ == "__main__":
    main()
