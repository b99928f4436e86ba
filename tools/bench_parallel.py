#!/usr/bin/env python3
"""Parallel step time on CPU: TP2 against TP1, PP2 against PP1 and the data-parallel gradient
reduction (none, post-backward, overlapped), in the same run.

Two gloo processes (megarch.parallel.spawn, one thread each) train the same model on the same
batches with AdamW. TP1 and PP1 are the single-process baseline (rank 0 alone; the other rank
waits), TP2 splits heads / feed-forward / vocabulary over both ranks, PP2 splits the layers into
two stages run with 1F1B. Each step is ``--micro`` micro-batches of ``--micro-batch`` rows of
``--seq-len`` tokens (gradient accumulation, or the pipeline's micro-batches). Per layout: the
first ``--warmup`` steps are excluded, the mean of the next ``--steps``, best of ``--trials``
(layouts interleaved within each trial). Prints a table and the ratios of step times: with no
communication TP2 / TP1 would be 0.5 (two cores instead of one) and PP2 / PP1 the 1F1B bubble's
(m + 1) / (2 m) for m micro-batches; what is above that is communication and overhead.

DP2 rows: both ranks train a replica (on the same micro-batches: only the time is read) with no
gradient communication
(``DP2-none``, the floor), with today's post-backward bucketed all-reduce (``DP2-post``,
megarch.parallel.data_parallel.all_reduce_grads) and with the reduction overlapped with the
last micro-batch's backward (``DP2-overlap``, megarch.parallel.grad_reduce), all with
``--bucket-mb`` buckets; the ratios to DP2-none are the cost of the communication. On one
machine's gloo the all-reduce is nearly free and cannot overlap much (the two ranks share the
cores); the gain is on a cluster's network (tools/estimate_memory.py models it).

Usage: python tools/bench_parallel.py [--preset cd_tiny] [--seq-len 128] [--micro-batch 4]
       [--micro 4] [--steps 5] [--warmup 2] [--trials 3] [--groups TP,PP,DP]
       [--bucket-mb 25] [--model.d_model 256 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

LAYOUTS = ("TP1", "TP2", "PP1", "PP2", "DP2-none", "DP2-post", "DP2-overlap")
GROUPS = {"TP": ("TP1", "TP2"), "PP": ("PP1", "PP2"),
          "DP": ("DP2-none", "DP2-post", "DP2-overlap")}
PROCESSES = {"TP1": 1, "TP2": 2, "PP1": 1, "PP2": 2, "DP2-none": 2, "DP2-post": 2,
             "DP2-overlap": 2}


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
    return build_model(cfg, "cpu", contexts.get(layout, contexts["TP1"]))


def _step(model, layout: str, batches: list[dict], optimizer, reduce=None) -> None:
    """One optimizer step over ``batches``; ``reduce``: (start, finish) of the DP reduction."""
    from megarch.model import lm_loss
    from megarch.parallel.pipeline import one_f_one_b

    tokens = float(sum(b["loss_mask"].sum() for b in batches))
    tp_group = model.tp_group if layout == "TP2" else None

    def loss_fn(logits, batch):
        return lm_loss(logits, batch["labels"], batch["loss_mask"], model.cfg.z_loss,
                       num_tokens=tokens, tp_group=tp_group)

    optimizer.zero_grad(set_to_none=True)
    if reduce is not None:
        reduce[0](len(batches))
    if layout == "PP2":
        one_f_one_b(model, batches, loss_fn)
    else:
        for batch in batches:
            loss_fn(model(**batch), batch)["loss"].backward()
    if reduce is not None:
        reduce[1]()
    optimizer.step()


def _reduction(model, layout: str, args: argparse.Namespace):
    """(start, finish) of ``layout``'s gradient reduction over both ranks (None: TP / PP)."""
    from megarch.parallel.data_parallel import all_reduce_grads
    from megarch.parallel.grad_reduce import GradReducer

    group = dist.group.WORLD
    if layout == "DP2-none":
        return (lambda n: None), (lambda: None)
    if layout == "DP2-post":
        return (lambda n: None), (lambda: all_reduce_grads(model, group, args.bucket_mb))
    if layout == "DP2-overlap":
        reducer = GradReducer(model, group, args.bucket_mb)
        return reducer.start, reducer.finish
    return None


def _time_layout(rank: int, cfg, layout: str, contexts: dict, batches: list[dict],
                 args: argparse.Namespace) -> float | None:
    """Mean seconds per step after the warm-up (None on a rank with no part in ``layout``)."""
    dist.barrier()
    if layout in ("TP1", "PP1") and rank != 0:
        dist.barrier()
        return None
    model = _build(cfg, layout, contexts).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reduce = _reduction(model, layout, args)
    for _ in range(args.warmup):
        _step(model, layout, batches, optimizer, reduce)
    if layout.startswith("DP"):  # both ranks start the timed steps together
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        _step(model, layout, batches, optimizer, reduce)
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
    layouts = [name for group in args.groups for name in GROUPS[group]]
    for _ in range(args.trials):
        for layout in layouts:
            seconds = _time_layout(rank, cfg, layout, contexts, batches, args)
            if seconds is not None:
                best[layout] = min(best.get(layout, float("inf")), seconds)
    return best


def format_table(best: dict[str, float], tokens_per_step: int, micro: int) -> str:
    """The printed table: one row per layout measured, then the ratios and their ideals.
    ``tokens_per_step``: of one replica (a DP2 step reads twice as many)."""
    lines = [f"{'layout':<12}{'processes':>10}{'ms / step':>12}{'tokens/s':>12}"]
    for layout in (name for name in LAYOUTS if name in best):
        seconds, tokens = best[layout], tokens_per_step * (2 if layout.startswith("DP") else 1)
        lines.append(f"{layout:<12}{PROCESSES[layout]:>10}{seconds * 1e3:>12.1f}"
                     f"{tokens / seconds:>12,.0f}")
    bubble = (micro + 1) / (2 * micro)
    if "TP2" in best:
        lines.append(f"TP2 / TP1 step time {best['TP2'] / best['TP1']:.3f} "
                     "(0.500 with free communication)")
    if "PP2" in best:
        lines.append(f"PP2 / PP1 step time {best['PP2'] / best['PP1']:.3f} "
                     f"({bubble:.3f} with free communication: the 1F1B bubble)")
    if "DP2-none" in best:
        none = best["DP2-none"]
        lines.append(f"DP2-post / DP2-none step time {best['DP2-post'] / none:.3f}, "
                     f"DP2-overlap / DP2-none {best['DP2-overlap'] / none:.3f}, "
                     f"DP2-overlap / DP2-post {best['DP2-overlap'] / best['DP2-post']:.3f} "
                     "(1.000 with free communication)")
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
    parser.add_argument("--groups", default="TP,PP,DP",
                        help="comma-separated layout groups to time: TP, PP, DP")
    parser.add_argument("--bucket-mb", type=float, default=25.0,
                        help="DP rows: gradient bucket size (parallel.grad_bucket_mb)")
    args, overrides = parser.parse_known_args(argv)
    for name, low in (("seq_len", 2), ("micro_batch", 1), ("micro", 1), ("steps", 1),
                      ("warmup", 0), ("trials", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    groups = [g.strip().upper() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        parser.error(f"--groups {args.groups}: give a comma-separated subset of TP,PP,DP")
    if not args.bucket_mb > 0:
        parser.error(f"--bucket-mb {args.bucket_mb}: must be > 0")
    args.groups = groups
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
