#!/usr/bin/env python3
"""Training stall of a checkpoint: synchronous save against asynchronous save, in the same run.

A model of the given preset with AdamW state (one optimizer step taken, so both moments exist)
is saved with ``run.async_save`` false (:func:`megarch.training.checkpoint.save_checkpoint`:
training waits for every file) and true (:func:`~megarch.training.checkpoint.start_checkpoint`:
training waits only for the copy to host memory; the files are written behind it). The stall
is the time the training loop is blocked; best of ``--trials``, saves interleaved. Prints a
table and the ratio async / sync stall (the issue's target on a GPU: <= 0.10).

Usage: python tools/bench_checkpoint.py [--preset cd_tiny] [--trials 3] [--device cuda]
       [--model.d_model 512 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def _model(preset: str, overrides: list[str], device: str):
    from megarch.config.overrides import apply_overrides
    from megarch.config.presets import get_model_preset
    from megarch.model import build_model

    cfg = get_model_preset(preset)
    apply_overrides(cfg, overrides, prefix="model")
    model = build_model(cfg.validate(), device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    return model, optimizer


def measure(preset: str = "cd_tiny", overrides: list[str] | None = None,
            trials: int = 3, device: str = "cpu") -> dict[str, float]:
    """Seconds of stall (best of ``trials``) of a synchronous and an asynchronous save, and the
    asynchronous one's write time behind training."""
    from megarch.training.checkpoint import TrainState, save_checkpoint, start_checkpoint

    model, optimizer = _model(preset, overrides or [], device)
    best = {"sync": float("inf"), "async": float("inf"), "async_total": float("inf")}
    with tempfile.TemporaryDirectory() as root:
        for trial in range(trials):
            for kind in ("sync", "async"):
                state = TrainState(step=trial + 1)
                out = os.path.join(root, f"{kind}{trial}")
                start = time.perf_counter()
                if kind == "sync":
                    save_checkpoint(out, state, model, optimizer, "{}")
                    best["sync"] = min(best["sync"], time.perf_counter() - start)
                    continue
                pending = start_checkpoint(out, state, model, optimizer, "{}")
                best["async"] = min(best["async"], time.perf_counter() - start)
                pending.wait()
                best["async_total"] = min(best["async_total"], time.perf_counter() - start)
    best["params"] = float(sum(p.numel() for p in model.parameters()))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cd_tiny")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the model lives (cpu, cuda)")
    args, overrides = parser.parse_known_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    from megarch.config.overrides import ConfigError

    try:
        result = measure(args.preset, overrides, args.trials, args.device)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint of {args.preset} ({result['params'] / 1e6:.1f}M parameters + AdamW) on "
          f"{args.device}, best of {args.trials}")
    print("| save | training stall (s) | files written (s) |")
    print("|---|---|---|")
    print(f"| synchronous | {result['sync']:.3f} | {result['sync']:.3f} |")
    print(f"| asynchronous | {result['async']:.3f} | {result['async_total']:.3f} |")
    print(f"async / sync stall: {result['async'] / result['sync']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
