#!/usr/bin/env python3
"""Model-parallel step time on CPU: TP2 against TP1 and PP2 against PP1, in the same run.

Two gloo processes (megarch.parallel.spawn, one thread each) train the same model on the same
batches with AdamW. TP1 and PP1 are the single-process baseline (rank 0 alone; the other rank
waits), TP2 splits heads / feed-forward / vocabulary over both ranks, PP2 splits the layers into
two stages run with 1F1B. Each step is ``--micro`` micro-batches of ``--micro-batch`` rows of
``--seq-len`` tokens (gradient accumulation, or the pipeline's micro-batches). Per layout: the
first ``--warmup`` steps are excluded, the mean of the next ``--steps``, best of ``--trials``
(layouts interleaved within each trial). Prints a table and the ratios of step times: with no
communication TP2 / TP1 would be 0.5 (two cores instead of one) and PP2 / PP1 the 1F1B bubble's
(m + 1) / (2 m) for m micro-batches; what is above that is communication and overhead.

Usage: python tools/bench_parallel.py [--preset cd_tiny] [--seq-len 128] [--micro-batch 4]
       [--micro 4] [--steps 5] [--warmup 2] [--trials 3] [--model.d_model 256 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

LAYOUTS = ("TP1", "TP2", "PP1", "PP2")


def _model_config(preset: str, overrides: list[str]):
    from megarch.config.overrides import apply_overrides
    from megarch.config.presets import get_model_preset

    cfg = get_model_preset(preset)
    apply_overrides(cfg, overrides, prefix="model")
    return cfg.validate()


def _batches(cfg, args: argparse.Namespace) -> list[dict]:
    """``--micro`` micro-batches of random tokens (decoder-only: loss on every token)."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq_len)
    out = []
    for _ in range(args.micro):
        tokens = torch.randint(0, cfg.vocab_size, shape, generator=gen)
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                    "loss_mask": torch.ones(shape), "prefix_len": torch.zeros(shape[0]).long()})
    return out


def _build(cfg, layout: str, contexts: dict):
    from megarch.model import build_model, build_stage

    torch.manual_seed(0)
    if layout == "PP2":
        return build_stage(cfg, contexts["PP2"], "cpu")
    return build_model(cfg, "cpu", contexts[layout])


def _step(model, layout: str, batches: list[dict], optimizer) -> None:
    """One optimizer step over ``batches``."""
    from megarch.model import lm_loss
    from megarch.parallel.pipeline import one_f_one_b

    tokens = float(sum(b["loss_mask"].sum() for b in batches))
    tp_group = model.tp_group if layout == "TP2" else None

    def loss_fn(logits, batch):
        return lm_loss(logits, batch["labels"], batch["loss_mask"], model.cfg.z_loss,
                       num_tokens=tokens, tp_group=tp_group)

    optimizer.zero_grad(set_to_none=True)
    if layout == "PP2":
        one_f_one_b(model, batches, loss_fn)
    else:
        for batch in batches:
            loss_fn(model(**batch), batch)["loss"].backward()
    optimizer.step()


def _time_layout(rank: int, cfg, layout: str, contexts: dict, batches: list[dict],
                 args: argparse.Namespace) -> float | None:
    """Mean seconds per step after the warm-up (None on a rank with no part in ``layout``)."""
    dist.barrier()
    if layout in ("TP1", "PP1") and rank != 0:
        dist.barrier()
        return None
    model = _build(cfg, layout, contexts).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.warmup):
        _step(model, layout, batches, optimizer)
    start = time.perf_counter()
    for _ in range(args.steps):
        _step(model, layout, batches, optimizer)
    seconds = (time.perf_counter() - start) / args.steps
    if layout in ("TP1", "PP1"):
        dist.barrier()
    return seconds


def _run_rank(rank: int, world: int, preset: str, overrides: list[str],
              args: argparse.Namespace) -> dict[str, float]:
    from megarch.parallel.context import ParallelContext

    os.environ.setdefault("MEGARCH_ATTENTION", "reference")
    cfg = _model_config(preset, overrides)
    contexts = {"TP1": ParallelContext.single(), "PP1": ParallelContext.single(),
                "TP2": ParallelContext.build(tp=world), "PP2": ParallelContext.build(pp=world)}
    batches = _batches(cfg, args)
    best: dict[str, float] = {}
    for _ in range(args.trials):
        for layout in LAYOUTS:
            seconds = _time_layout(rank, cfg, layout, contexts, batches, args)
            if seconds is not None:
                best[layout] = min(best.get(layout, float("inf")), seconds)
    return best


def format_table(best: dict[str, float], tokens_per_step: int, micro: int) -> str:
    """The printed table: one row per layout, then the two ratios and their ideals."""
    lines = [f"{'layout':<8}{'processes':>10}{'ms / step':>12}{'tokens/s':>12}"]
    for layout in LAYOUTS:
        seconds = best[layout]
        lines.append(f"{layout:<8}{int(layout[2]):>10}{seconds * 1e3:>12.1f}"
                     f"{tokens_per_step / seconds:>12,.0f}")
    bubble = (micro + 1) / (2 * micro)
    lines.append(f"TP2 / TP1 step time {best['TP2'] / best['TP1']:.3f} "
                 "(0.500 with free communication)")
    lines.append(f"PP2 / PP1 step time {best['PP2'] / best['PP1']:.3f} "
                 f"({bubble:.3f} with free communication: the 1F1B bubble)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cd_tiny", help="a model preset (decoder-only)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per trial")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trial")
    parser.add_argument("--trials", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    for name, low in (("seq_len", 2), ("micro_batch", 1), ("micro", 1), ("steps", 1),
                      ("warmup", 0), ("trials", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    from megarch.config.overrides import ConfigError
    from megarch.parallel.spawn import spawn

    try:
        cfg = _model_config(args.preset, overrides)
    except ConfigError as err:
        parser.error(str(err))
    if cfg.is_encoder_decoder:
        parser.error(f"--preset {args.preset}: give a decoder-only preset (cd_*, nd_*)")
    best = spawn(2, timeout_s=1800)(_run_rank, args.preset, overrides, args)[0]
    print(f"{args.preset} {' '.join(overrides)}: {args.micro} x {args.micro_batch} x "
          f"{args.seq_len} tokens a step, best of {args.trials} trials of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(format_table(best, args.micro * args.micro_batch * args.seq_len, args.micro))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
