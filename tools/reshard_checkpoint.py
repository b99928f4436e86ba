#!/usr/bin/env python3
"""Convert a checkpoint to another tensor/pipeline-parallel layout (default: one unsharded file).

    python tools/reshard_checkpoint.py runs/cd_flm_tp2pp2 runs/cd_flm_tp1            # -> TP1 x PP1
    python tools/reshard_checkpoint.py runs/cd_flm_tp1 runs/cd_flm_tp2pp2 --tp 2 --pp 2

SRC is a checkpoint directory (``out_dir/checkpoints/step_N``) or a run's ``out_dir`` (its newest
complete checkpoint, or ``--step N``), of any layout. The result is written atomically to
``DEST/checkpoints/step_N``: the model and optimizer state (AdamW moments, Adafactor's factored
row / column moments) cut for every (TP rank, stage) of ``--tp`` x ``--pp`` by the code a run
uses to resume at another layout (megarch.training.resume), the same ``state.json`` and
lineage, the config with the new ``parallel.tp`` / ``parallel.pp``, each target rank's RNG
state (the same rank's when the source has it, else rank 0's) and the manifest of sizes and
checksums. Every source file is checked against the source's manifest as it is read. A TP1 x
PP1 result is an ordinary single-process checkpoint (megarch-eval, ``load_model``); any result
resumes a run of its layout (``--run.resume DEST/checkpoints/step_N``) or of another one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from tqdm import tqdm

from megarch.atomic import atomic_dir
from megarch.config.train import TrainConfig
from megarch.model import build_model, build_stage, pipeline_layout
from megarch.parallel.context import ParallelContext
from megarch.parallel.reshard import optimizer_group_names
from megarch.parallel.tensor_parallel import partition_dims
from megarch.training.checkpoint import (
    CONFIG_FILE,
    LINEAGE_FILE,
    PARAM_NAMES,
    STATE_FILE,
    CheckpointError,
    find_latest,
    list_checkpoints,
    read_state,
    rng_file,
    shard_file,
    step_path,
)
from megarch.training.checkpoint_files import (
    save_model_file,
    save_rng_file,
    write_manifest,
)
from megarch.training.optim import build_optimizer
from megarch.training.resume import SavedCheckpoint

_PIPELINE_FIELDS = {"virtual_stages": 1, "encoder_stages": 0}
"""Pipeline fields of ParallelConfig (where present) and the values the target layout uses."""


def resolve_source(src: str, step: int | None = None) -> str:
    """The checkpoint directory ``src`` names: itself, or its run's checkpoint of ``step``
    (default: the newest complete one)."""
    if os.path.isfile(os.path.join(src, STATE_FILE)):
        return src
    if step is not None:
        path = step_path(src, step)
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            found = [s for s, _ in list_checkpoints(src)]
            raise CheckpointError(f"{src}: no complete checkpoint of step {step} (--step); "
                                  f"complete steps: {found or 'none'}")
        return path
    latest = find_latest(src)
    if latest is None:
        raise CheckpointError(f"{src} is neither a checkpoint (a directory holding "
                              f"{STATE_FILE}) nor a run directory with a complete checkpoint")
    return latest


def target_config(cfg: TrainConfig, tp: int, pp: int) -> TrainConfig:
    """``cfg`` with the target layout; refuses one that does not divide the model (whole
    heads per rank: with grouped-query attention a k/v weight can split evenly mid-head, so
    the head counts are checked, not only the tensors)."""
    try:
        cfg.model.validate_tp(tp)
    except ValueError as err:
        raise CheckpointError(f"--tp {tp} (parallel.tp) does not divide the model: "
                              f"{err}") from None
    model = build_model(cfg.model, "meta")
    dims = partition_dims(model)
    for name, param in model.named_parameters():
        dim = dims[name]
        if dim is not None and param.shape[dim] % tp:
            raise CheckpointError(f"--tp {tp} (parallel.tp) does not divide the model: {name} "
                                  f"has {param.shape[dim]} along its split dim {dim}; choose "
                                  "a divisor of model.n_heads, n_kv_heads, d_ff and vocab_size")
    if pp > 1:
        try:
            pipeline_layout(cfg.model, pp)
        except ValueError as err:
            raise CheckpointError(f"--pp {pp} (parallel.pp) does not divide the model: "
                                  f"{err}") from None
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.parallel.sequence_parallel = cfg.parallel.sequence_parallel and tp > 1
    for field, value in _PIPELINE_FIELDS.items():
        if hasattr(cfg.parallel, field):
            setattr(cfg.parallel, field, value)
    return cfg


def stage_model(cfg: TrainConfig, pp_rank: int) -> torch.nn.Module:
    """The TP1 meta model of pipeline stage ``pp_rank`` of ``cfg.parallel.pp`` (its names)."""
    if cfg.parallel.pp == 1:
        return build_model(cfg.model, "meta")
    extra = {f: getattr(cfg.parallel, f) for f in _PIPELINE_FIELDS if hasattr(cfg.parallel, f)}
    ctx = ParallelContext(pp=cfg.parallel.pp, rank=pp_rank)
    try:
        return build_stage(cfg.model, ctx, "meta", **extra)
    except ValueError as err:
        raise CheckpointError(f"--pp {cfg.parallel.pp} (parallel.pp): {err}") from None


def _write_shards(saved: SavedCheckpoint, cfg: TrainConfig, directory: str,
                  progress: bool) -> None:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    bar = tqdm(total=tp * pp, unit="shard", disable=not progress)
    streams = saved.rng_streams()
    for pp_rank in range(pp):
        stage = stage_model(cfg, pp_rank)
        dims = partition_dims(stage)
        groups = optimizer_group_names(stage, build_optimizer(cfg.optim, stage))
        for tp_rank in range(tp):
            def file(kind: str, t: int = tp_rank, p: int = pp_rank) -> str:
                return os.path.join(directory, shard_file(kind, t, p, tp, pp))

            save_model_file(saved.model_state(dims, tp_rank, tp), file("model"))
            optimizer = saved.optimizer_state(groups, tp_rank, tp, dims)
            optimizer[PARAM_NAMES] = [name for group in groups for name in group]
            torch.save(optimizer, file("optimizer"))
            rng, own = saved.rng(pp_rank)
            if rng is not None and own:  # a stage the source lacks derives its stream on resume
                save_rng_file(rng, file("rng"))
            bar.update()
        for (stage, dp_rank), source in streams.items():  # the other DP ranks'
            if stage == pp_rank and dp_rank > 0:  # checked, then copied as it is
                saved.check(os.path.basename(source))
                shutil.copyfile(source, os.path.join(directory,
                                                     rng_file(0, pp_rank, dp_rank, tp, pp)))
    bar.close()


def reshard(src: str, dest: str, tp: int = 1, pp: int = 1, step: int | None = None,
            progress: bool = False) -> str:
    """Write checkpoint ``src`` (or its run's newest / ``step``) at layout ``tp`` x ``pp``
    to ``dest/checkpoints/step_N``; return that path (refused when it exists)."""
    saved = SavedCheckpoint(resolve_source(src, step))
    saved.require("optimizer")
    cfg = target_config(saved.config(), tp, pp)
    saved.check(STATE_FILE)
    state = read_state(saved.path)
    path = step_path(dest, state.step)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"{path} already exists: choose another DEST or remove it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_dir(path) as tmp:
        _write_shards(saved, cfg, tmp, progress)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(cfg.to_json())
        if os.path.isfile(os.path.join(saved.path, LINEAGE_FILE)):
            saved.check(LINEAGE_FILE)
            shutil.copyfile(os.path.join(saved.path, LINEAGE_FILE),
                            os.path.join(tmp, LINEAGE_FILE))
        state_json = json.dumps(state.__dict__, indent=2)
        write_manifest(tmp, texts={STATE_FILE: state_json})
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            f.write(state_json)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a checkpoint directory, or a run's out_dir (newest)")
    parser.add_argument("dest", help="out_dir of the converted checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    parser.add_argument("--step", type=int, default=None, help="default: the newest")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.error("--tp and --pp must be >= 1")
    try:
        path = reshard(args.src, args.dest, args.tp, args.pp, args.step, progress=True)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the TP{args.tp} x PP{args.pp} checkpoint {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
