"""Reading a checkpoint back at any TP/PP layout, and the Trainer's save / resume.

A checkpoint (megarch.training.checkpoint) records its layout in ``config.json``
(``parallel.tp`` x ``parallel.pp``) and holds one model / optimizer / RNG file per (TP rank,
stage). :class:`SavedCheckpoint` reads it lazily: files are opened with
``torch.load(mmap=True)``, so a rank reads only the bytes of the tensors it needs.

- Same layout (same ``tp`` x ``pp`` and the saved shard of this rank has exactly this model's
  names and shapes, so e.g. other virtual or encoder stages count as another layout): this
  rank's files are loaded as they are, bit for bit.
- Another layout: each parameter is found by name in the first saved stage holding it (the
  tied embedding of the first and last stage: the first stage's), its saved TP shards are
  cut to this rank's shard (:func:`megarch.parallel.reshard.take_shard`), and so is each of its
  optimizer state tensors (AdamW moments like the parameter; Adafactor's factored ``row_var`` /
  ``col_var`` by :func:`~megarch.parallel.reshard.state_split_dim`; the scalar ``step`` from
  TP rank 0). The optimizer's param-group hyperparameters are the saved ones.
- RNG: the same (TP rank, stage)'s file when the saved layout has it, else rank 0's (logged).

:func:`check_shapes` refuses a checkpoint of another model, naming the fields.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from megarch.config.overrides import ConfigError
from megarch.config.train import TrainConfig, config_from_json
from megarch.parallel.context import ParallelContext
from megarch.parallel.reshard import (
    optimizer_group_names,
    optimizer_param_names,
    reshard_param_state,
    take_shard,
)
from megarch.parallel.rng import global_draw, rank_seed
from megarch.parallel.tensor_parallel import partition_dims
from megarch.training.checkpoint import (
    CONFIG_FILE,
    PARAM_NAMES,
    STATE_FILE,
    TrainState,
    find_latest,
    is_own_checkpoint,
    read_state,
    rng_file,
    save_checkpoint,
    set_rng_state,
    shard_file,
)

if TYPE_CHECKING:
    from megarch.training.loop import Trainer

log = logging.getLogger(__name__)

SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "head_dim", "d_ff", "n_layers",
                "n_decoder_layers", "position", "rel_buckets", "tie_embeddings")
"""Model fields a checkpoint must share with the config resuming it (the arch may change
between causal_decoder and nonc_decoder: adaptation only changes the mask)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the fix."""


class SavedCheckpoint:
    """One checkpoint directory of any layout, read lazily (memory-mapped) by name."""

    def __init__(self, path: str):
        self.path = path
        self.tp, self.pp = saved_layout(path)
        self._files: dict[str, dict] = {}
        self._owners: dict[str, int] | None = None
        self.require("model")

    def config(self) -> TrainConfig:
        """The saved :class:`TrainConfig`."""
        with open(os.path.join(self.path, CONFIG_FILE), encoding="utf-8") as f:
            return config_from_json(f.read())

    def file(self, kind: str, tp_rank: int, pp_rank: int) -> str:
        """The path of ``kind``'s file of saved (TP rank, stage)."""
        return os.path.join(self.path, shard_file(kind, tp_rank, pp_rank, self.tp, self.pp))

    def require(self, kind: str) -> None:
        """Refuse the checkpoint when one of ``kind``'s shard files is missing."""
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                file = self.file(kind, tp_rank, pp_rank)
                if not os.path.isfile(file):
                    raise CheckpointError(
                        f"{file} is missing: checkpoint {self.path} was saved at parallel.tp="
                        f"{self.tp} x parallel.pp={self.pp} ({CONFIG_FILE}) and needs one "
                        f"{kind} file per TP rank and stage; copy the missing file back or "
                        "resume from another checkpoint"
                    )

    def load(self, kind: str, tp_rank: int, pp_rank: int) -> dict:
        """The saved object of ``kind`` for (TP rank, stage), memory-mapped (cached)."""
        file = self.file(kind, tp_rank, pp_rank)
        if file not in self._files:
            self._files[file] = torch.load(file, map_location="cpu", mmap=True,
                                           weights_only=kind != "rng")
        return self._files[file]

    def owner(self, name: str) -> int:
        """The first saved stage holding ``name`` (the tied embedding: the first stage's)."""
        if self._owners is None:
            self._owners = {}
            for pp_rank in reversed(range(self.pp)):
                self._owners.update(dict.fromkeys(self.load("model", 0, pp_rank), pp_rank))
        if name not in self._owners:
            raise CheckpointError(f"{name} is in none of {self.path}'s model files: the "
                                  "checkpoint is of another model")
        return self._owners[name]

    def model_state(self, dims: Mapping[str, int | None], tp_rank: int,
                    tp: int) -> dict[str, torch.Tensor]:
        """The model tensors named in ``dims`` as TP rank ``tp_rank`` of ``tp`` holds them
        (``dims``: each one's partition dim, :func:`partition_dims` of the model)."""
        out = {}
        for name, dim in dims.items():
            stage = self.owner(name)
            parts = [self.load("model", t, stage)[name] for t in range(self.tp)]
            out[name] = take_shard(parts, dim, tp_rank, tp)
        return out

    def optimizer_state(self, groups: list[list[str]], tp_rank: int, tp: int,
                        dims: Mapping[str, int | None]) -> dict:
        """The optimizer state dict (torch's format) of TP rank ``tp_rank`` of ``tp`` whose
        param groups hold the parameters ``groups`` (names, in order) split along ``dims``."""
        self.require("optimizer")
        saved_groups = self.load("optimizer", 0, 0)["param_groups"]
        if len(saved_groups) != len(groups):
            raise CheckpointError(f"{self.file('optimizer', 0, 0)} has {len(saved_groups)} "
                                  f"param groups, this optimizer {len(groups)}: it was saved "
                                  "by another optimizer (optim.name)")
        state, param_groups, index = {}, [], 0
        for saved, names in zip(saved_groups, groups, strict=True):
            param_groups.append({**{k: v for k, v in saved.items() if k != "params"},
                                 "params": list(range(index, index + len(names)))})
            for name in names:
                states = self._param_states(name)
                if states:
                    state[index] = reshard_param_state(dims.get(name), states, tp_rank,
                                                       tp)
                index += 1
        return {"state": state, "param_groups": param_groups}

    def _param_states(self, name: str) -> list[dict]:
        """The saved optimizer state of ``name`` on each saved TP rank (empty: none yet)."""
        stage, states = self.owner(name), []
        for tp_rank in range(self.tp):
            saved = self.load("optimizer", tp_rank, stage)
            if PARAM_NAMES not in saved:
                raise CheckpointError(f"{self.file('optimizer', tp_rank, stage)} has no "
                                      f"{PARAM_NAMES}: resume it at its own layout")
            index = self._index(tp_rank, stage, saved[PARAM_NAMES]).get(name)
            if index is None:
                raise CheckpointError(f"{self.file('optimizer', tp_rank, stage)} has no state "
                                      f"for {name}: it was saved by another optimizer setup")
            if index in saved["state"]:
                states.append(saved["state"][index])
        return states

    def _index(self, tp_rank: int, pp_rank: int, names: list[str]) -> dict[str, int]:
        key = f"index {tp_rank} {pp_rank}"
        if key not in self._files:
            self._files[key] = {name: index for index, name in enumerate(names)}
        return self._files[key]

    def rng(self, pp_rank: int, dp_rank: int = 0) -> tuple[dict | None, bool]:
        """(RNG states, own) for a rank of stage ``pp_rank`` and data-parallel rank
        ``dp_rank``: the saved states of that stream when the checkpoint has them (own: True;
        the TP ranks of a stage share one stream, so TP rank 0's file serves them all), else
        stage 0's of data-parallel rank 0 (own: False: derive a stream of its own from it);
        (None, False) without any RNG file."""
        if pp_rank < self.pp:
            mine = os.path.join(self.path, rng_file(0, pp_rank, dp_rank, self.tp, self.pp))
            if os.path.isfile(mine):
                return torch.load(mine, map_location="cpu", weights_only=False), True
        if os.path.isfile(self.file("rng", 0, 0)):
            log.info("%s has no RNG state of stage %d, data-parallel rank %d: deriving one from "
                     "rank 0's", self.path, pp_rank, dp_rank)
            return self.load("rng", 0, 0), False
        return None, False

    def rng_streams(self) -> dict[tuple[int, int], str]:
        """``{(stage, data-parallel rank): RNG file}`` of the saved streams (TP rank 0's)."""
        found = {}
        for pp_rank in range(self.pp):
            dp_rank = 0
            while os.path.isfile(file := os.path.join(
                    self.path, rng_file(0, pp_rank, dp_rank, self.tp, self.pp))):
                found[(pp_rank, dp_rank)] = file
                dp_rank += 1
        return found

    def same_layout(self, model: torch.nn.Module, ctx: ParallelContext) -> bool:
        """True when this rank's saved files hold exactly ``model``'s names and shapes."""
        if (self.tp, self.pp) != (ctx.tp, ctx.pp):
            return False
        saved = self.load("model", ctx.tp_rank, ctx.pp_rank)
        mine = model.state_dict()
        return saved.keys() == mine.keys() and all(
            saved[k].shape == v.shape for k, v in mine.items())


def saved_layout(path: str) -> tuple[int, int]:
    """(tp, pp) of checkpoint ``path``: its config's ``parallel``; a directory without a
    readable config is TP1 x PP1."""
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            parallel = json.load(f).get("parallel", {})
    except (OSError, ValueError, AttributeError) as err:
        if os.path.isfile(os.path.join(path, shard_file("model", 0, 0, 2, 2))):
            raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)} cannot be read ({err}): "
                                  "it records the layout of the sharded checkpoint's files; "
                                  "restore it") from None
        return 1, 1
    return int(parallel.get("tp", 1)), int(parallel.get("pp", 1))


def load_into(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              ctx: ParallelContext, restore_rng: bool = True) -> TrainState:
    """Load checkpoint ``path`` into this rank's ``model`` and ``optimizer`` (see the module
    docstring), restore the RNGs if asked; return its :class:`TrainState`."""
    saved = SavedCheckpoint(path)
    if saved.same_layout(model, ctx):
        model.load_state_dict(saved.load("model", ctx.tp_rank, ctx.pp_rank))
        if optimizer is not None:
            record = _plain_load(saved.file("optimizer", ctx.tp_rank, ctx.pp_rank))
            names = record.pop(PARAM_NAMES, None)
            if names is None or names == optimizer_param_names(model, optimizer):
                optimizer.load_state_dict(record)
            else:  # the same parameters in another order: match them by name
                groups = optimizer_group_names(model, optimizer)
                optimizer.load_state_dict(saved.optimizer_state(groups, ctx.tp_rank, ctx.tp,
                                                                partition_dims(model)))
    else:
        log.info("resharding %s from tp %d x pp %d to tp %d x pp %d", path, saved.tp, saved.pp,
                 ctx.tp, ctx.pp)
        dims = partition_dims(model)
        model.load_state_dict(saved.model_state(dims, ctx.tp_rank, ctx.tp))
        if optimizer is not None:
            groups = optimizer_group_names(model, optimizer)
            optimizer.load_state_dict(saved.optimizer_state(groups, ctx.tp_rank, ctx.tp, dims))
    if restore_rng:
        state, own = saved.rng(ctx.pp_rank, ctx.dp_rank)
        if state is not None:
            set_rng_state(state)
        stream = ctx.pp_rank * ctx.dp + ctx.dp_rank
        if not own and stream > 0:  # rank 0's stream: derive one of its own (the same on
            torch.manual_seed(rank_seed(global_draw(), stream))  # the TP ranks of this stream)
    state = read_state(path)
    log.info("loaded checkpoint %s (step %d)", path, state.step)
    return state


def _plain_load(file: str) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


def check_shapes(path: str, model_cfg) -> None:
    """Refuse a checkpoint whose model has other shapes than ``model_cfg``, naming the
    fields."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        saved = config_from_json(f.read()).model
    differ = [
        f"model.{name}={getattr(saved, name)!r} there, {getattr(model_cfg, name)!r} here"
        for name in SHAPE_FIELDS
        if getattr(saved, name) != getattr(model_cfg, name)
    ]
    if saved.is_encoder_decoder != model_cfg.is_encoder_decoder:
        differ.append(f"model.arch={saved.arch} there, {model_cfg.arch} here")
    if differ:
        raise ConfigError(f"checkpoint {path} does not fit this model: {'; '.join(differ)}")


def resume_trainer(trainer: Trainer) -> None:
    """:meth:`Trainer.resume`: load the checkpoint ``run.resume`` names (auto: the newest in
    out_dir, if any; a run's out_dir: its newest), whatever its layout."""
    run = trainer.cfg.run
    if run.resume == "none":
        existing = find_latest(run.out_dir)
        if existing is not None:
            raise ConfigError(
                f"run.resume=none but run.out_dir={run.out_dir!r} already holds checkpoints "
                f"({existing}): choose another run.out_dir, delete them, or resume (auto)"
            )
        return
    path = find_latest(run.out_dir) if run.resume == "auto" else run.resume
    if path is None:
        return
    if not os.path.isfile(os.path.join(path, STATE_FILE)):  # a run's out_dir: its newest
        path = find_latest(path) or path
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ConfigError(f"run.resume={path!r}: no such checkpoint (a step_* directory "
                          f"holding {STATE_FILE}, or a run's out_dir with one)")
    latest = find_latest(run.out_dir)
    if is_own_checkpoint(path, run.out_dir) and latest != path and (
            read_state(latest).step > read_state(path).step):
        raise ConfigError(
            f"run.resume={path!r} is older than this run.out_dir's newest checkpoint {latest}: "
            "continuing here would interleave two histories (keep_last and resume auto would "
            "mix them); resume into another run.out_dir, or delete the newer checkpoints")
    check_shapes(path, trainer.cfg.model)
    try:
        trainer.state = load_into(path, trainer.model, trainer.optimizer, trainer.ctx)
    except CheckpointError as err:
        raise ConfigError(f"run.resume: {err}") from None
    trainer.checkpoint = path
    log.info("resuming from %s at step %d (%d samples consumed)", path, trainer.state.step,
             trainer.state.consumed_samples)


def save_trainer(trainer: Trainer) -> str:
    """:meth:`Trainer.save_all`: the collective checkpoint of the trainer's current state."""
    cfg = trainer.cfg
    trainer.checkpoint = save_checkpoint(cfg.run.out_dir, trainer.state, trainer.model,
                                         trainer.optimizer, cfg.to_json(), cfg.run.keep_last,
                                         trainer.lineage_record(), trainer.ctx)
    return trainer.checkpoint
