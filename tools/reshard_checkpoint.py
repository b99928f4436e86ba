#!/usr/bin/env python3
"""Merge a tensor- and/or pipeline-parallel run's checkpoints into one single-process checkpoint.

    python tools/reshard_checkpoint.py runs/cd_flm_tp2pp2 runs/cd_flm_tp1 [--step 1000]

The run's ``out_dir/tp_rank_RR_of_TT[_pp_rank_SS_of_PP]/checkpoints/step_*`` directories
(megarch.training.loop) are merged into ``DEST/checkpoints/step_*``: the full model, the merged
AdamW state, the step and the config with ``parallel.tp = parallel.pp = 1``. megarch-eval,
``load_model`` and a TP1 x PP1 run (``--run.resume PATH``) read it as any checkpoint. TP shards
are concatenated along their split dims (megarch.parallel.reshard); pipeline stages hold disjoint
layers under their global names, and the tied embedding of the first and last stage is taken
from the first. The RNG state saved is this tool's, not the run's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch
from torch import nn

from megarch.config.train import TrainConfig, config_from_json
from megarch.model import build_model
from megarch.parallel.context import ParallelContext
from megarch.parallel.pipeline import build_stage
from megarch.parallel.reshard import merge_tp_model, merge_tp_optimizer, optimizer_param_names
from megarch.training.checkpoint import find_latest, read_state, save_checkpoint, step_path
from megarch.training.optim import build_optimizer

_SHARD = re.compile(r"^tp_rank_(\d+)_of_(\d+)(?:_pp_rank_(\d+)_of_(\d+))?$")


def shard_checkpoints(run_dir: str, step: int | None = None) -> dict[tuple[int, int], str]:
    """``{(pp_rank, tp_rank): checkpoint dir}`` of ``run_dir`` at ``step`` (default: newest)."""
    roots = {}
    for name in sorted(os.listdir(run_dir)):
        match = _SHARD.match(name)
        if match:
            roots[(int(match.group(3) or 0), int(match.group(1)))] = os.path.join(run_dir, name)
    if not roots:
        raise FileNotFoundError(f"{run_dir}: no tp_rank_* directories (not a TP/PP run?)")
    if step is None:
        latest = find_latest(next(iter(roots.values())))
        if latest is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint")
        step = read_state(latest).step
    paths = {key: step_path(root, step) for key, root in roots.items()}
    missing = [p for p in paths.values() if not os.path.isdir(p)]
    if missing:
        raise FileNotFoundError(f"step {step} is missing on some ranks: {missing}")
    return paths


def tp_checkpoints(run_dir: str, step: int | None = None) -> list[str]:
    """The TP ranks' checkpoint dirs of a TP-only run, in rank order."""
    return [p for _, p in sorted(shard_checkpoints(run_dir, step).items())]


def _stage_model(cfg: TrainConfig, pp_rank: int) -> nn.Module:
    """A TP1 meta model of pipeline stage ``pp_rank`` (the whole model without PP)."""
    if cfg.parallel.pp == 1:
        return build_model(cfg.model, "meta")
    return build_stage(cfg.model, ParallelContext(pp=cfg.parallel.pp, rank=pp_rank), "meta")


def _merge_stage(cfg: TrainConfig, pp_rank: int, paths: list[str]) -> tuple[dict, dict, dict]:
    """(model state, optimizer state by parameter name, saved param_groups) of one stage."""
    models = [torch.load(os.path.join(p, "model.pt"), map_location="cpu") for p in paths]
    optims = [torch.load(os.path.join(p, "optimizer.pt"), map_location="cpu") for p in paths]
    stage = _stage_model(cfg, pp_rank)
    names = optimizer_param_names(stage, build_optimizer(cfg.optim, stage))
    merged = merge_tp_optimizer(optims, names, [models[0][n].shape for n in names])
    by_name = {names[index]: state for index, state in merged["state"].items()}
    return merge_tp_model(models), by_name, merged["param_groups"]


def merge(paths: dict[tuple[int, int], str] | list[str], dest: str) -> str:
    """Write the merged TP1 x PP1 checkpoint of the shard checkpoints ``paths`` under ``dest``
    (a list means TP ranks of one stage)."""
    if isinstance(paths, list):
        paths = {(0, tp_rank): p for tp_rank, p in enumerate(paths)}
    first = paths[min(paths)]
    with open(os.path.join(first, "config.json"), encoding="utf-8") as f:
        cfg = config_from_json(f.read())
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if sorted(paths) != [(s, t) for s in range(pp) for t in range(tp)]:
        raise ValueError(f"checkpoints {sorted(paths)} do not cover tp={tp} x pp={pp}")
    model_state, optim_state, groups = {}, {}, None
    for pp_rank in reversed(range(pp)):  # the first stage last: its tied embedding wins
        stage = [paths[(pp_rank, t)] for t in range(tp)]
        stage_model, stage_optim, stage_groups = _merge_stage(cfg, pp_rank, stage)
        model_state.update(stage_model)
        optim_state.update(stage_optim)
        groups = stage_groups
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.sequence_parallel = False
    model = build_model(cfg.model, "meta")
    model.load_state_dict(model_state, assign=True)
    optimizer = build_optimizer(cfg.optim, model)
    full = optimizer.state_dict()
    for group, saved in zip(full["param_groups"], groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    names = optimizer_param_names(model, optimizer)
    full["state"] = {i: optim_state[n] for i, n in enumerate(names) if n in optim_state}
    optimizer.load_state_dict(full)
    return save_checkpoint(dest, read_state(first), model, optimizer, cfg.to_json())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the TP/PP run's out_dir")
    parser.add_argument("dest", help="out_dir of the merged checkpoint")
    parser.add_argument("--step", type=int, default=None, help="default: the newest")
    args = parser.parse_args(argv)
    path = merge(shard_checkpoints(args.run_dir, args.step), args.dest)
    print(f"merged TP1 x PP1 checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
