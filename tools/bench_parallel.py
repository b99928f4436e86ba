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
``--device cuda`` runs the DP rows on GPUs (rank r on GPU r; NCCL with two or more GPUs, gloo
over one GPU's two ranks otherwise; bf16 autocast, the fused attention kernel).

CKPT rows: the training stall of a synchronous and of an asynchronous checkpoint of the same
model with AdamW state (``save-sync`` / ``save-async``, tools/bench_checkpoint.measure, one
process on ``--device``, best of ``--trials``) and the async save's time to its last file; the
issue's target on a GPU is an async / sync stall <= 0.10.

Usage: python tools/bench_parallel.py [--preset cd_tiny] [--seq-len 128] [--micro-batch 4]
       [--micro 4] [--steps 5] [--warmup 2] [--trials 3] [--groups TP,PP,DP,CKPT]
       [--bucket-mb 25] [--device cpu] [--model.d_model 256 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

LAYOUTS = ("TP1", "TP2", "PP1", "PP2", "DP2-none", "DP2-post", "DP2-overlap")
SAVES = ("save-sync", "save-async")
GROUPS = {"TP": ("TP1", "TP2"), "PP": ("PP1", "PP2"),
          "DP": ("DP2-none", "DP2-post", "DP2-overlap"), "CKPT": SAVES}
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
        batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                 "loss_mask": torch.ones(shape), "prefix_len": torch.zeros(shape[0]).long()}
        out.append({k: v.to(args.rank_device) for k, v in batch.items()})
    return out


def _build(cfg, layout: str, contexts: dict, device: str):
    from megarch.model import build_model, build_stage

    torch.manual_seed(0)
    if layout == "PP2":
        return build_stage(cfg, contexts["PP2"], device)
    return build_model(cfg, device, contexts.get(layout, contexts["TP1"]))


def _step(model, layout: str, batches: list[dict], optimizer, reduce=None) -> None:
    """One optimizer step over ``batches``; ``reduce``: (start, finish) of the DP reduction.
    On a GPU the forward runs under bf16 autocast (float32 parameters and gradients)."""
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
        cuda = batches[0]["tokens"].is_cuda
        for batch in batches:
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                logits = model(**batch)
            loss_fn(logits, batch)["loss"].backward()
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
    model = _build(cfg, layout, contexts, args.rank_device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reduce = _reduction(model, layout, args)
    for _ in range(args.warmup):
        _step(model, layout, batches, optimizer, reduce)
    _synchronize(args.rank_device)
    if layout.startswith("DP"):  # both ranks start the timed steps together
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        _step(model, layout, batches, optimizer, reduce)
    _synchronize(args.rank_device)
    seconds = (time.perf_counter() - start) / args.steps
    if layout in ("TP1", "PP1"):
        dist.barrier()
    return seconds


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _run_rank(rank: int, world: int, preset: str, overrides: list[str],
              args: argparse.Namespace) -> dict[str, float]:
    from megarch.parallel.context import ParallelContext

    if args.device == "cuda":
        args.rank_device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(args.rank_device)
    else:
        args.rank_device = "cpu"
        os.environ.setdefault("MEGARCH_ATTENTION", "reference")
    cfg = _model_config(preset, overrides)
    contexts = {"TP1": ParallelContext.single(), "PP1": ParallelContext.single()}
    if "TP" in args.groups:
        contexts["TP2"] = ParallelContext.build(tp=world)
    if "PP" in args.groups:
        contexts["PP2"] = ParallelContext.build(pp=world)
    batches = _batches(cfg, args)
    best: dict[str, float] = {}
    layouts = [name for group in args.groups if group != "CKPT" for name in GROUPS[group]]
    for _ in range(args.trials):
        for layout in layouts:
            seconds = _time_layout(rank, cfg, layout, contexts, batches, args)
            if seconds is not None:
                best[layout] = min(best.get(layout, float("inf")), seconds)
    return best


def format_table(best: dict[str, float], tokens_per_step: int, micro: int) -> str:
    """The printed table: one row per layout measured, then the ratios and their ideals; then
    the checkpoint rows (``save-sync`` / ``save-async`` stalls and ``save-async-written``, the
    async save's time to its last file) and their ratio. ``tokens_per_step``: of one replica (a
    DP2 step reads twice as many)."""
    lines = []
    if any(name in best for name in LAYOUTS):
        lines.append(f"{'layout':<12}{'processes':>10}{'ms / step':>12}{'tokens/s':>12}")
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
    if "save-sync" in best:
        if "save-params" in best:
            lines.append(f"checkpoint of {best['save-params'] / 1e6:.1f}M parameters + AdamW")
        lines.append(f"{'checkpoint':<12}{'processes':>10}{'ms stall':>12}{'ms written':>12}")
        written = {"save-sync": best["save-sync"], "save-async": best["save-async-written"]}
        for name in SAVES:
            lines.append(f"{name:<12}{1:>10}{best[name] * 1e3:>12.1f}"
                         f"{written[name] * 1e3:>12.1f}")
        lines.append(f"save-async / save-sync stall {best['save-async'] / best['save-sync']:.3f} "
                     "(target on a GPU: <= 0.100)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The options (``groups`` a list) and the ``--model.*`` overrides, checked: a bad value
    exits with one line naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cd_tiny", help="a model preset (decoder-only)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per trial")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--groups", default="TP,PP,DP,CKPT",
                        help="comma-separated groups to time: TP, PP, DP, CKPT")
    parser.add_argument("--bucket-mb", type=float, default=25.0,
                        help="DP rows: gradient bucket size (parallel.grad_bucket_mb)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the DP and CKPT rows on GPUs (TP / PP rows are CPU-only)")
    args, overrides = parser.parse_known_args(argv)
    for name, low in (("seq_len", 2), ("micro_batch", 1), ("micro", 1), ("steps", 1),
                      ("warmup", 0), ("trials", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    groups = [g.strip().upper() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        parser.error(f"--groups {args.groups}: give a comma-separated subset of TP,PP,DP,CKPT")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
        if {"TP", "PP"} & set(groups):
            parser.error("--device cuda times the DP and CKPT groups: give --groups DP,CKPT")
    if not args.bucket_mb > 0:
        parser.error(f"--bucket-mb {args.bucket_mb}: must be > 0")
    args.groups = groups
    from megarch.config.overrides import ConfigError

    try:
        cfg = _model_config(args.preset, overrides)
    except ConfigError as err:
        parser.error(str(err))
    if cfg.is_encoder_decoder:
        parser.error(f"--preset {args.preset}: give a decoder-only preset (cd_*, nd_*)")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    from megarch.parallel.spawn import spawn

    args, overrides = parse_args(argv)
    groups = args.groups
    best: dict[str, float] = {}
    backend = "gloo"
    if set(groups) - {"CKPT"}:
        if args.device == "cuda" and torch.cuda.device_count() >= 2:
            backend = "nccl"
        best = spawn(2, timeout_s=1800, backend=backend)(_run_rank, args.preset, overrides,
                                                          args)[0]
    if "CKPT" in groups:  # one process, no process group: the single-rank save
        from tools.bench_checkpoint import measure

        saves = measure(args.preset, overrides, args.trials, args.device)
        best.update({"save-sync": saves["sync"], "save-async": saves["async"],
                     "save-async-written": saves["async_total"], "save-params": saves["params"]})
    print(f"{args.preset} {' '.join(overrides)} on {args.device} ({backend}): {args.micro} x "
          f"{args.micro_batch} x {args.seq_len} tokens a step, best of {args.trials} trials of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(format_table(best, args.micro * args.micro_batch * args.seq_len, args.micro))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
