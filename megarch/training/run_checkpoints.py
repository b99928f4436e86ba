"""The Trainer's checkpoints: resume (``run.resume``: none, auto, a path) and save.

Writing is megarch.training.checkpoint, reading megarch.training.resume; neither imports the
other, nor the loop: this module joins them for :class:`~megarch.training.loop.Trainer`
(``trainer`` below), and only the loop imports it.
"""

from __future__ import annotations

import logging
import os

from megarch.config.overrides import ConfigError
from megarch.parallel.context import ParallelContext
from megarch.parallel.data_parallel import any_over
from megarch.training.checkpoint import (
    DAMAGED,
    STATE_FILE,
    CheckpointError,
    PendingSave,
    checkpoint_dir,
    find_latest,
    is_own_checkpoint,
    list_checkpoints,
    read_state,
    save_checkpoint,
    start_checkpoint,
)
from megarch.training.checkpoint_files import damage
from megarch.training.resume import SavedCheckpoint, check_shapes, load_into

log = logging.getLogger(__name__)


def _problem(path: str, ctx: ParallelContext) -> str | None:
    """What is wrong with checkpoint ``path``, the same answer on every rank: each rank
    checksums its share of the files (one read of the checkpoint in all), sizes and the
    manifest everywhere. An older format raises (on every rank)."""
    mine = damage(path, ctx.rank, ctx.world_size)
    if not any_over(mine is not None, ctx.world_group):
        return None
    return mine or "a file failed its checksum on another rank (its log names the file)"


def _set_aside(path: str) -> str:
    """Rename damaged checkpoint ``path`` out of the ``step_N`` names (kept, never pruned:
    its bytes may be worth a look), so the run's history continues from an intact step."""
    aside, n = path + ".damaged", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.damaged{n}"
    os.rename(path, aside)
    return aside


def _newest_intact(out_dir: str, ctx: ParallelContext) -> str | None:
    """run.resume=auto: the newest checkpoint of ``out_dir`` that verifies; each damaged newer
    one is reported (which file, what is wrong) and set aside. None without checkpoints;
    refused when every one is damaged."""
    damaged: list[tuple[str, str]] = []
    for _, path in reversed(list_checkpoints(out_dir)):
        problem = _problem(path, ctx)
        if problem is None:
            for bad, reason in damaged:
                log.warning("run.resume=auto: checkpoint %s is damaged (%s); resuming from the "
                            "previous complete one, %s", bad, reason, path)
                if ctx.is_main:
                    log.warning("moved the damaged checkpoint to %s", _set_aside(bad))
            ctx.barrier()
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(
            f"run.resume=auto: every checkpoint in {checkpoint_dir(out_dir)} is damaged, the "
            f"newest: {damaged[0][1]}; restore one, or start afresh in another run.out_dir")
    return None


def resume_trainer(trainer) -> None:
    """:meth:`Trainer.resume`: load the checkpoint ``run.resume`` names (auto: the newest
    intact one in out_dir, if any; a run's out_dir: its newest), whatever its layout. The
    checkpoint is verified first (manifest sizes and checksums, state.json's fields): a
    damaged one named explicitly is refused, naming the file."""
    run, ctx = trainer.cfg.run, trainer.ctx
    if run.resume == "none":
        existing = find_latest(run.out_dir)
        if existing is not None:
            raise ConfigError(
                f"run.resume=none but run.out_dir={run.out_dir!r} already holds checkpoints "
                f"({existing}): choose another run.out_dir, delete them, or resume (auto)"
            )
        return
    if run.resume == "auto":
        path = _newest_intact(run.out_dir, ctx)
        if path is None:
            return
    else:
        path = run.resume
        if not os.path.isfile(os.path.join(path, STATE_FILE)):  # a run's out_dir: its newest
            path = find_latest(path) or path
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise ConfigError(f"run.resume={path!r}: no such checkpoint (a step_* directory "
                              f"holding {STATE_FILE}, or a run's out_dir with one)")
        problem = _problem(path, ctx)
        if problem is not None:
            raise CheckpointError(f"run.resume={path}: {problem}: {DAMAGED}")
    state = read_state(path)
    newer = [p for step, p in list_checkpoints(run.out_dir) if step > state.step]
    if is_own_checkpoint(path, run.out_dir) and newer:
        raise ConfigError(
            f"run.resume={path!r} is older than this run.out_dir's newest checkpoint "
            f"{newer[-1]}: continuing here would interleave two histories (keep_last and "
            "resume auto would mix them); resume into another run.out_dir, or delete the "
            "newer checkpoints")
    check_shapes(path, trainer.cfg.model)
    try:
        trainer.state = load_into(SavedCheckpoint(path, verified=True), trainer.model,
                                  trainer.optimizer, ctx)
    except CheckpointError as err:
        raise CheckpointError(f"run.resume: {err}") from None
    trainer.checkpoint = path
    log.info("resuming from %s at step %d (%d samples consumed)", path, trainer.state.step,
             trainer.state.consumed_samples)


def save_trainer(trainer) -> str:
    """:meth:`Trainer.save_all`: the collective checkpoint of the trainer's current state;
    with ``run.async_save`` its files are written in the background (after the previous
    background save, if any, is done: :func:`wait_for_save`)."""
    cfg = trainer.cfg
    args = (cfg.run.out_dir, trainer.state, trainer.model, trainer.optimizer, cfg.to_json(),
            cfg.run.keep_last, trainer.lineage_record(), trainer.ctx)
    background = cfg.run.async_save == "true" or (
        cfg.run.async_save == "auto" and trainer.device.type == "cuda")
    if not background:
        trainer.checkpoint = save_checkpoint(*args)
        return trainer.checkpoint
    wait_for_save(trainer)  # at most one save in flight
    pending = start_checkpoint(*args)
    if isinstance(pending, PendingSave):
        trainer.pending_save = pending
        trainer.checkpoint = pending.path
    else:  # the step already had a checkpoint
        trainer.checkpoint = pending
    return trainer.checkpoint


def wait_for_save(trainer) -> None:
    """Block until the trainer's background save (if any) is written (and, on the main rank,
    published); raise what went wrong in it."""
    pending, trainer.pending_save = getattr(trainer, "pending_save", None), None
    if pending is not None:
        pending.wait()
