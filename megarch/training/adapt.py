"""Runs that start from another checkpoint: multitask finetuning, adaptation, and their lineage.

- ``run.init_from CKPT`` starts a run from the weights of a checkpoint (a directory, or a run's
  out_dir: its newest), e.g. multitask finetuning (MTF) of a pretrained model. By default only
  the weights: a fresh optimizer and step 0. ``run.init_keep_step true`` also continues the
  checkpoint's step, tokens seen and optimizer state, so the schedule goes on from there. A run
  that already has checkpoints in its out_dir resumes them instead (init_from is for the start).
- Adaptation (PAPER.md): ``lm-a`` turns a non-causal decoder pretrained with MLM (or PLM) into a
  causal decoder trained with FLM; ``nc-a`` turns a causal FLM decoder into a non-causal MLM one.
  :func:`adapt_config` switches only ``model.arch`` (the attention mask) and ``data.objective``
  (the sample format); every weight is kept. Encoder-decoders are refused: their two stacks and
  cross-attention have no decoder-only counterpart. The data position restarts at 0 (the new
  objective's samples are another stream) while step, tokens and optimizer state continue.
- Lineage: every checkpoint written by :class:`StagedTrainer` holds ``lineage.json``: the stages
  that made its weights (pretrain, lm-a, nc-a, mtf, continue), each with its arch, objective,
  the checkpoint and step it started from, and the tokens it saw, plus the tokens seen under
  each objective in total.
- ``data.mixture_cap``: :func:`resolve_mixture` blends several datasets by their example counts
  capped at the cap (T0's mixture: 500,000), as data.weights for the existing blending.

Usage::

    megarch-train --adapt nc-a --run.init_from runs/cd_flm --run.steps 171008
    megarch-train --preset cd_mtf_tiny --run.init_from runs/cd_flm_tiny --data.paths a,b
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from megarch.config.data import DataConfig
from megarch.config.overrides import ConfigError, apply_overrides
from megarch.config.train import TrainConfig, apply_dict
from megarch.data.blending import split_range
from megarch.data.datasets import resolve_prefix
from megarch.data.indexed_dataset import IndexedDataset
from megarch.training.checkpoint import (
    TrainState,
    find_latest,
    read_lineage,
    read_state,
)
from megarch.training.loop import Trainer
from megarch.training.resume import SavedCheckpoint, load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adaptation:
    """One adaptation: which (arch, objective) it starts from and what it switches to."""

    name: str
    """lm-a or nc-a."""
    source_arch: str
    """The checkpoint's model.arch."""
    source_objectives: tuple[str, ...]
    """The checkpoint's data.objective, one of these."""
    target_arch: str
    """The new model.arch (the attention mask)."""
    target_objective: str
    """The new data.objective (the sample format)."""


ADAPTATIONS: dict[str, Adaptation] = {
    "lm-a": Adaptation("lm-a", "nonc_decoder", ("mlm", "plm"), "causal_decoder", "flm"),
    "nc-a": Adaptation("nc-a", "causal_decoder", ("flm",), "nonc_decoder", "mlm"),
}
"""The study's adaptations (PAPER.md): LM-A (ND+MLM -> CD+FLM) and NC-A (CD+FLM -> ND+MLM)."""


def resolve_init_path(path: str) -> str:
    """A checkpoint directory: ``path`` itself, or the newest checkpoint of run dir ``path``."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    latest = find_latest(path)
    if latest is None:
        raise ConfigError(
            f"run.init_from={path!r}: neither a checkpoint (no state.json) nor a run directory "
            "holding checkpoints/step_*; give a checkpoint directory or a run's out_dir"
        )
    return latest


def read_checkpoint_config(path: str) -> TrainConfig:
    """The :class:`TrainConfig` saved in checkpoint ``path`` (checked against its manifest;
    an older pickled checkpoint is refused with the command converting it)."""
    return SavedCheckpoint(path).config()


def adapt_config(parent: TrainConfig, kind: str) -> TrainConfig:
    """A copy of ``parent`` adapted by ``kind`` (lm-a, nc-a): only model.arch and
    data.objective change. Refuses encoder-decoders and pairs the adaptation does not start
    from, saying why."""
    if kind not in ADAPTATIONS:
        raise ConfigError(f"--adapt {kind!r}: use one of {', '.join(ADAPTATIONS)}")
    adaptation = ADAPTATIONS[kind]
    arch, objective = parent.model.arch, parent.data.objective
    if arch == "encoder_decoder":
        raise ConfigError(
            f"--adapt {kind}: the checkpoint is an encoder_decoder; adaptation only changes the "
            "attention mask of a decoder-only network (causal and non-causal decoders share "
            "every weight), and an encoder-decoder's separate stacks and cross-attention have "
            "no decoder-only counterpart; adapt a causal_decoder or nonc_decoder checkpoint"
        )
    if arch != adaptation.source_arch or objective not in adaptation.source_objectives:
        wanted = " or ".join(f"{adaptation.source_arch}+{o}" for o in adaptation.source_objectives)
        raise ConfigError(
            f"--adapt {kind} starts from a {wanted} checkpoint (PAPER.md), not {arch}+{objective}"
            f"; it yields {adaptation.target_arch}+{adaptation.target_objective}"
        )
    cfg = copy.deepcopy(parent)
    cfg.model.arch = adaptation.target_arch
    cfg.data.objective = adaptation.target_objective
    return cfg


def config_diff(a: TrainConfig, b: TrainConfig, sections: tuple[str, ...] = ("model", "data",
                "optim", "parallel")) -> dict[str, tuple[Any, Any]]:
    """``{"section.field": (value in a, value in b)}`` for the fields that differ."""
    diff = {}
    for section in sections:
        left, right = getattr(a, section), getattr(b, section)
        for field in dataclasses.fields(left):
            x, y = getattr(left, field.name), getattr(right, field.name)
            if x != y:
                diff[f"{section}.{field.name}"] = (x, y)
    return diff


def _override_value(overrides: list[str], dotted: str) -> str | None:
    """The value of ``--dotted V`` / ``--dotted=V`` in ``overrides`` (dashes or underscores)."""
    wanted = dotted.replace("-", "_")
    for i, arg in enumerate(overrides):
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key.replace("-", "_") == wanted:
            return value if eq else (overrides[i + 1] if i + 1 < len(overrides) else None)
    return None


def load_adapt_config(kind: str, overrides: list[str], config_file: str | None = None,
                      reset_schedule: bool = False) -> TrainConfig:
    """The config of ``megarch-train --adapt KIND --run.init_from CKPT ...``: the checkpoint's
    own config adapted by :func:`adapt_config`, written to ``<its out_dir>_<kind>``, continuing
    its step and optimizer (unless ``reset_schedule``), then ``config_file`` and overrides."""
    init = _override_value(overrides, "run.init_from")
    if not init:
        raise ConfigError(f"--adapt {kind} needs --run.init_from CHECKPOINT (or a run's out_dir)")
    path = resolve_init_path(init)
    parent = read_checkpoint_config(path)
    cfg = adapt_config(parent, kind)
    cfg.run.init_from, cfg.run.init_keep_step = path, not reset_schedule
    cfg.run.out_dir = f"{parent.run.out_dir.rstrip('/')}_{kind}"
    cfg.run.resume = "auto"
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                apply_dict(cfg, json.load(f))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"--config {config_file}: {err}") from None
    apply_overrides(cfg, overrides)
    cfg.run.init_from = resolve_init_path(cfg.run.init_from)
    return cfg.validate()


def resolve_mixture(data: DataConfig) -> list[float] | None:
    """With ``data.mixture_cap`` and several paths (and no explicit weights), set
    ``data.weights`` to each dataset's train-split examples capped at the cap; return them."""
    if data.mixture_cap <= 0 or data.weights is not None or len(data.paths) < 2:
        return data.weights
    key = "inputs" if data.objective == "multitask" else data.text_key
    weights = []
    for path in data.paths:
        examples = IndexedDataset(resolve_prefix(path, key)).num_documents
        begin, end = split_range(examples, data.split, "train")
        weights.append(float(min(end - begin, data.mixture_cap)))
    data.weights = weights
    log.info("mixture weights (examples capped at %d): %s", data.mixture_cap,
             dict(zip(data.paths, weights, strict=True)))
    return weights


def stage_name(parent: TrainConfig | None, cfg: TrainConfig) -> str:
    """What this run is to its parent: pretrain (no parent), mtf, lm-a, nc-a or continue."""
    if parent is None:
        return "pretrain"
    if cfg.data.objective == "multitask" and parent.data.objective != "multitask":
        return "mtf"
    for adaptation in ADAPTATIONS.values():
        if (parent.model.arch, cfg.model.arch, cfg.data.objective) == (
                adaptation.source_arch, adaptation.target_arch, adaptation.target_objective):
            return adaptation.name
    return "continue"


def _stage(name: str, cfg: TrainConfig, state: TrainState, parent_path: str | None,
           parent_step: int | None) -> dict[str, Any]:
    return {"stage": name, "arch": cfg.model.arch, "objective": cfg.data.objective,
            "out_dir": cfg.run.out_dir, "from_checkpoint": parent_path, "from_step": parent_step,
            "start_step": state.step, "end_step": state.step,
            "start_tokens": state.tokens_seen, "tokens": 0}


def lineage_of(path: str) -> dict[str, Any]:
    """The lineage of checkpoint ``path``: its lineage.json, or for a checkpoint written
    without one, a single stage built from its config and state."""
    lineage = read_lineage(path)
    if lineage is not None:
        return lineage
    cfg, state = read_checkpoint_config(path), read_state(path)
    stage = _stage("pretrain" if not cfg.run.init_from else "continue", cfg, TrainState(),
                   cfg.run.init_from or None, None)
    stage.update(end_step=state.step, tokens=state.tokens_seen)
    return {"stages": [stage], "tokens_by_objective": {cfg.data.objective: state.tokens_seen}}


def _totals(stages: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for stage in stages:
        totals[stage["objective"]] = totals.get(stage["objective"], 0) + int(stage["tokens"])
    return totals


class StagedTrainer(Trainer):
    """A :class:`Trainer` that resolves ``data.mixture_cap``, starts from ``run.init_from``
    when there is nothing to resume, and writes ``lineage.json`` into every checkpoint."""

    def __init__(self, cfg: TrainConfig, *args: Any, **kwargs: Any):
        resolve_mixture(cfg.data)
        super().__init__(cfg, *args, **kwargs)  # e.g. the parallel context
        self.lineage: dict[str, Any] = {"stages": [], "tokens_by_objective": {}}

    def resume(self) -> None:
        """Resume this run's own checkpoint if any, else start from ``run.init_from``."""
        super().resume()
        if self.checkpoint is not None:
            lineage = copy.deepcopy(lineage_of(self.checkpoint))
            if lineage["stages"][-1]["out_dir"] != self.cfg.run.out_dir:  # another run's
                lineage["stages"].append(_stage("continue", self.cfg, self.state,
                                                self.checkpoint, self.state.step))
            self.lineage = lineage
        elif self.cfg.run.init_from:
            self.lineage = self.init_from(self.cfg.run.init_from)
        else:
            self.lineage = {"stages": [_stage("pretrain", self.cfg, self.state, None, None)],
                            "tokens_by_objective": {}}

    def init_from(self, where: str) -> dict[str, Any]:
        """Load the weights of checkpoint ``where`` (and with ``run.init_keep_step`` its step,
        tokens and optimizer state); return the lineage this run extends."""
        path = resolve_init_path(where)
        self._check_shapes(path)
        parent = read_checkpoint_config(path)
        keep = self.cfg.run.init_keep_step
        optimizer = self.optimizer if keep and parent.optim.name == self.cfg.optim.name else None
        if keep and optimizer is None:
            log.warning("init_from %s: optimizer %s there, %s here: a fresh optimizer", path,
                        parent.optim.name, self.cfg.optim.name)
        restored = load_checkpoint(path, self.model, optimizer, restore_rng=False,
                                   ctx=self.ctx)  # any TP/PP layout
        if keep:
            if self.cfg.run.steps <= restored.step:
                raise ConfigError(
                    f"run.steps={self.cfg.run.steps} is not above the restored step "
                    f"{restored.step} of {path}: give the total to reach (the study's NC-A ran "
                    "131,072 -> 171,008), or reset the schedule (--adapt-reset-schedule)"
                )
            self.state = TrainState(step=restored.step, tokens_seen=restored.tokens_seen,
                                    skipped_steps=restored.skipped_steps)
        name = stage_name(parent, self.cfg)
        log.info("%s: starting from %s (step %d), %s", name, path, restored.step,
                 "continuing its step and schedule" if keep else "weights only, step 0")
        lineage = copy.deepcopy(lineage_of(path))
        lineage["stages"].append(_stage(name, self.cfg, self.state, path, restored.step))
        return lineage

    def lineage_record(self) -> dict:
        """The lineage so far, this stage's end step and tokens brought up to date."""
        stage = self.lineage["stages"][-1]
        stage["end_step"] = self.state.step
        stage["tokens"] = self.state.tokens_seen - stage["start_tokens"]
        self.lineage["tokens_by_objective"] = _totals(self.lineage["stages"])
        return self.lineage
