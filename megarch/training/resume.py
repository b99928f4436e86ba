"""Reading a checkpoint back at any TP/PP layout (the Trainer's resume and save are
megarch.training.run_checkpoints; writing is megarch.training.checkpoint).

A checkpoint (megarch.training.checkpoint) records its layout in ``config.json``
(``parallel.tp`` x ``parallel.pp``) and holds one model / optimizer / RNG file per (TP rank,
stage). :class:`SavedCheckpoint` reads it lazily: the model files are safetensors read tensor
by tensor, the optimizer files ``torch.load(mmap=True, weights_only=True)`` (never a pickle of
objects), so a rank reads only the bytes of the tensors it needs. Each file is checked against
the checkpoint's manifest (size, checksum) before it is read; the Trainer's resume
(megarch.training.run_checkpoints) checks the whole checkpoint first, and with
``run.resume=auto`` falls back to the newest intact one.

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
    DAMAGED,
    LINEAGE_FILE,
    PARAM_NAMES,
    STATE_FILE,
    CheckpointError,
    TrainState,
    read_state,
    rng_file,
    set_rng_state,
    shard_file,
)
from megarch.training.checkpoint_files import (
    TensorFile,
    read_manifest,
    read_rng_file,
    size_problem,
    verify_file,
)

log = logging.getLogger(__name__)

SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "kv_heads", "head_dim", "d_ff", "n_layers",
                "n_decoder_layers", "position", "rel_buckets", "tie_embeddings")
"""Model fields a checkpoint must share with the config resuming it (the arch may change
between causal_decoder and nonc_decoder: adaptation only changes the mask). ``kv_heads`` is
``n_kv_heads`` resolved, so a config saved before that field existed (multi-head) still fits."""


class ModelMismatchError(CheckpointError):
    """A checkpoint of another model than the one it is loaded into."""


class SavedCheckpoint:
    """One checkpoint directory of any layout, read lazily (memory-mapped) by name; each file
    checked against the manifest before its first read (``verified``: all were checked)."""

    def __init__(self, path: str, verified: bool = False):
        self.path = path
        self.manifest = read_manifest(path)  # refuses the older pickled format
        self._verified: set[str] = set(self.manifest["files"]) if verified else set()
        self.tp, self.pp = saved_layout(path)
        self._files: dict[str, object] = {}
        self._owners: dict[str, int] | None = None
        self.require("model")
        for name, entry in self.manifest["files"].items():  # cheap: sizes only
            if problem := size_problem(path, name, entry):
                raise CheckpointError(f"{problem}: {DAMAGED}")
        self.state: TrainState | None = None
        for name in (CONFIG_FILE, STATE_FILE, LINEAGE_FILE):  # small: checked, parsed up front
            if os.path.isfile(os.path.join(path, name)):
                self.check(name)
                if name == STATE_FILE:
                    self.state = read_state(path)
                else:
                    _read_json_object(os.path.join(path, name))

    def check(self, name: str) -> None:
        """Refuse file ``name`` unless its size and checksum are the manifest's (once)."""
        if name not in self._verified:
            if problem := verify_file(self.path, name, self.manifest):
                raise CheckpointError(f"{problem}: {DAMAGED}")
            self._verified.add(name)

    def config(self) -> TrainConfig:
        """The saved :class:`TrainConfig`."""
        file = os.path.join(self.path, CONFIG_FILE)
        self.check(CONFIG_FILE)
        try:
            with open(file, encoding="utf-8") as f:
                return config_from_json(f.read())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{file} cannot be read ({err}): {DAMAGED}") from None

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

    def load(self, kind: str, tp_rank: int, pp_rank: int):
        """The saved object of ``kind`` for (TP rank, stage) (cached): the model's a
        :class:`~megarch.training.checkpoint.TensorFile` (tensors read by name), the
        optimizer's its record (memory-mapped), the RNG's its states."""
        return self._read(shard_file(kind, tp_rank, pp_rank, self.tp, self.pp), kind)

    def _read(self, name: str, kind: str):
        file = os.path.join(self.path, name)
        if file not in self._files:
            self.check(name)
            if kind == "model":
                self._files[file] = TensorFile(file)
            elif kind == "rng":
                self._files[file] = read_rng_file(file)
            else:
                self._files[file] = _load_tensors_only(file)
        return self._files[file]

    def owner(self, name: str) -> int:
        """The first saved stage holding ``name`` (the tied embedding: the first stage's)."""
        if self._owners is None:
            self._owners = {}
            for pp_rank in reversed(range(self.pp)):
                self._owners.update(dict.fromkeys(self.load("model", 0, pp_rank), pp_rank))
        if name not in self._owners:
            raise ModelMismatchError(f"{name} is in none of {self.path}'s model files: the "
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
            mine = rng_file(0, pp_rank, dp_rank, self.tp, self.pp)
            if os.path.isfile(os.path.join(self.path, mine)):
                return self._read(mine, "rng"), True
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
        return set(saved) == set(mine) and all(
            saved.shape(k) == v.shape for k, v in mine.items())


def saved_layout(path: str) -> tuple[int, int]:
    """(tp, pp) of checkpoint ``path``: its config's ``parallel``; a directory without a
    readable config is TP1 x PP1."""
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            parallel = json.load(f).get("parallel", {})
        tp, pp = parallel.get("tp", 1), parallel.get("pp", 1)
        if type(tp) is not int or type(pp) is not int or tp < 1 or pp < 1:
            raise ValueError(f"parallel.tp={tp!r}, parallel.pp={pp!r}: not integers >= 1")
    except (OSError, ValueError, AttributeError) as err:
        if os.path.isfile(os.path.join(path, shard_file("model", 0, 0, 2, 2))):
            raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)} cannot be read ({err}): "
                                  "it records the layout of the sharded checkpoint's files; "
                                  "restore it") from None
        return 1, 1
    return tp, pp


def load_into(path: str | SavedCheckpoint, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer | None, ctx: ParallelContext,
              restore_rng: bool = True) -> TrainState:
    """Load checkpoint ``path`` (or an open :class:`SavedCheckpoint`) into this rank's
    ``model`` and ``optimizer`` (see the module docstring), restore the RNGs if asked; return
    its :class:`TrainState`."""
    saved = path if isinstance(path, SavedCheckpoint) else SavedCheckpoint(path)
    path = saved.path
    if saved.same_layout(model, ctx):
        model.load_state_dict(dict(saved.load("model", ctx.tp_rank, ctx.pp_rank)))
        if optimizer is not None:
            saved.require("optimizer")
            record = dict(saved.load("optimizer", ctx.tp_rank, ctx.pp_rank))
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
    state = saved.state or read_state(path)  # no state.json: refused, naming it
    log.info("loaded checkpoint %s (step %d)", path, state.step)
    return state


def _read_json_object(file: str) -> dict:
    """The JSON object in ``file``, refused (naming it) when it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}): {DAMAGED}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds {type(value).__name__}, not a JSON object: "
                              f"{DAMAGED}")
    return value


def _load_tensors_only(file: str) -> dict:
    """A ``torch.save`` file holding only tensors and plain containers (``weights_only``:
    torch's restricted unpickler refuses any other object, so nothing in it can run)."""
    try:
        record = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{file} cannot be read as tensors only ({reason}): "
                              f"{DAMAGED}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{file} holds {type(record).__name__}, not a state dict: "
                              f"{DAMAGED}")
    return record


def check_shapes(path: str, model_cfg) -> None:
    """Refuse a checkpoint whose model has other shapes than ``model_cfg``, naming the
    fields."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        return
    saved = SavedCheckpoint(path).config().model
    differ = [  # kv_heads: n_kv_heads resolved (a config without the field means n_heads)
        f"model.{name.replace('kv_heads', 'n_kv_heads')}={getattr(saved, name)!r} there, "
        f"{getattr(model_cfg, name)!r} here"
        for name in SHAPE_FIELDS
        if getattr(saved, name) != getattr(model_cfg, name)
    ]
    if saved.is_encoder_decoder != model_cfg.is_encoder_decoder:
        differ.append(f"model.arch={saved.arch} there, {model_cfg.arch} here")
    if differ:
        raise ConfigError(f"checkpoint {path} does not fit this model: {'; '.join(differ)}")


def load_model(path: str, device: torch.device | str = "cpu"):
    """``(model, config)`` of checkpoint ``path`` of any layout: the single-process model its
    ``config.json`` describes (``parallel.tp = pp = 1`` in the returned config), with its
    weights, in eval mode (for evaluation and conversion; no optimizer, no RNG)."""
    from megarch.model import build_model

    saved = SavedCheckpoint(path)
    cfg = saved.config()
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.sequence_parallel = False
    model = build_model(cfg.model, device)
    model.load_state_dict(saved.model_state(partition_dims(model), 0, 1))
    return model.eval(), cfg


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    ctx: ParallelContext | None = None,
) -> TrainState:
    """Load checkpoint ``path`` (any TP/PP layout) into ``model`` (this rank's shard or stage
    under ``ctx``; default a single process), ``optimizer`` and the RNGs; return its
    :class:`TrainState`. See :func:`megarch.training.resume.load_into`."""
    return load_into(path, model, optimizer, ctx or ParallelContext.single(), restore_rng)
