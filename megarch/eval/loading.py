"""Load a trained model for evaluation: the model, its resolved config and its tokenizer.

A checkpoint is a directory holding ``config.json`` (the resolved
:class:`~megarch.config.train.TrainConfig`) and the weights, as :mod:`megarch.training.checkpoint`
writes it: ``model.safetensors`` (the state dict), or from a tensor/pipeline-parallel run one
``model_tpTT_ppPP.safetensors`` per TP rank and stage, which are merged into the single-process
model in memory (megarch.training.resume), each file checked against the checkpoint's manifest
and read tensor by tensor (no pickle). An older checkpoint's pickled ``model.pt`` is refused
with the command that converts it. :func:`load_for_eval` also accepts a run's ``out_dir`` (or its
``checkpoints`` folder) and then takes the newest complete checkpoint there.

The tokenizer comes from the config's ``data.tokenizer`` spec. A relative path there was
relative to the training run's working directory; when it does not exist from here, it is also
looked for relative to the run's ``out_dir`` and that folder's parents. Pass ``tokenizer=`` to
name it explicitly.
"""

from __future__ import annotations

import logging
import os

import torch

from megarch.config.train import TrainConfig, config_from_json
from megarch.data.tokenizers import Tokenizer, load_tokenizer
from megarch.model import DecoderLM, EncoderDecoderLM, build_model
from megarch.parallel.tensor_parallel import partition_dims
from megarch.training.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_latest,
    shard_file,
)
from megarch.training.checkpoint_files import (
    legacy_files,
)
from megarch.training.resume import ModelMismatchError, SavedCheckpoint

log = logging.getLogger(__name__)

MODEL_FILE = shard_file("model", 0, 0, 1, 1)
CONFIG_FILE = "config.json"


class EvalError(ValueError):
    """A checkpoint, tokenizer or option that evaluation cannot use; the message says the fix."""


def _is_checkpoint(path: str) -> bool:
    sharded = shard_file("model", 0, 0, 2, 2)  # the first shard's name (any sharded layout)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and (any(
        os.path.isfile(os.path.join(path, f)) for f in (MODEL_FILE, sharded))
        or bool(legacy_files(path)))  # refused by SavedCheckpoint with the migration


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory ``path`` names: itself, or the newest complete checkpoint of
    the run whose ``out_dir`` (or ``out_dir/checkpoints``) it is."""
    if _is_checkpoint(path):
        return path
    if not os.path.isdir(path):
        raise EvalError(f"checkpoint {path} not found; pass a checkpoint directory "
                        f"(holding {MODEL_FILE} and {CONFIG_FILE}) or a run's out_dir")
    out_dir = path
    if os.path.basename(os.path.normpath(path)) == "checkpoints":
        out_dir = os.path.dirname(os.path.normpath(path))
    latest = find_latest(out_dir)
    if latest is None or not _is_checkpoint(latest):
        raise EvalError(
            f"{path} is neither a checkpoint (no {MODEL_FILE} + {CONFIG_FILE}) nor a run "
            f"directory with a complete checkpoint under {checkpoint_dir(out_dir)}; pass one"
        )
    return latest


def read_config(checkpoint: str) -> TrainConfig:
    """The :class:`TrainConfig` saved in checkpoint directory ``checkpoint``."""
    path = os.path.join(checkpoint, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return config_from_json(f.read())
    except (OSError, ValueError) as err:
        raise EvalError(f"{path}: cannot read the run's config ({err})") from None


def _tokenizer_candidates(spec: str, checkpoint: str) -> list[str]:
    """``spec`` as given, then (if it is a relative path) beside the run and its parents."""
    if spec == "bytes" or os.path.isabs(spec):
        return [spec]
    path, _, options = spec.partition("?")
    candidates = [spec]
    folder = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))  # the out_dir
    for _ in range(4):
        candidates.append(os.path.join(folder, path) + ("?" + options if options else ""))
        folder = os.path.dirname(folder)
    return candidates


def load_run_tokenizer(cfg: TrainConfig, checkpoint: str, spec: str | None = None) -> Tokenizer:
    """The tokenizer of the run (``spec`` overrides the config's ``data.tokenizer``)."""
    if spec is not None:
        return load_tokenizer(spec)
    candidates = _tokenizer_candidates(cfg.data.tokenizer, checkpoint)
    for candidate in candidates:
        if candidate == "bytes" or os.path.exists(candidate.partition("?")[0]):
            if candidate != cfg.data.tokenizer:
                log.info("tokenizer %s not found from here; using %s", cfg.data.tokenizer,
                         candidate)
            return load_tokenizer(candidate)
    raise EvalError(
        f"the run's tokenizer {cfg.data.tokenizer!r} (data.tokenizer in {checkpoint}/"
        f"{CONFIG_FILE}) was not found from here nor beside the run; pass its path "
        "(--tokenizer PATH)"
    )


def _clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``_orig_mod.`` / ``module.`` prefixes torch.compile and DDP add."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def load_for_eval(
    checkpoint_path: str,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
) -> tuple[DecoderLM | EncoderDecoderLM, TrainConfig, Tokenizer]:
    """(model in eval mode on ``device``, its :class:`TrainConfig`, its tokenizer).

    Args:
        checkpoint_path: a checkpoint directory, or a run's out_dir (newest checkpoint).
        device: where the model goes.
        tokenizer: a tokenizer spec overriding the config's ``data.tokenizer``.
    """
    path = resolve_checkpoint(checkpoint_path)
    try:  # the manifest, every file's size, the config's checksum (an older format: refused)
        saved = SavedCheckpoint(path)
    except CheckpointError as err:
        raise EvalError(str(err)) from None
    cfg = read_config(path)
    tok = load_run_tokenizer(cfg, path, tokenizer)
    cfg.resolve_vocab(tok.vocab_size)
    if cfg.model.vocab_size < tok.vocab_size:
        raise EvalError(f"{path}: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tok.vocab_size}, {tok.name}); pass the run's "
                        "own tokenizer")
    device = torch.device(device)
    model = build_model(cfg.model, device="meta")
    model.to_empty(device=device)
    try:  # any layout: merged to TP1 x PP1 by name, tensor by tensor
        state = saved.model_state(partition_dims(model), 0, 1)
        model.load_state_dict(_clean_state_dict(state))
    except (ModelMismatchError, RuntimeError) as err:
        raise EvalError(f"{path}/{MODEL_FILE} does not match the model of its "
                        f"{CONFIG_FILE}: {str(err).splitlines()[0]}") from None
    except CheckpointError as err:
        raise EvalError(str(err)) from None
    log.info("loaded %s (%s) with tokenizer %s on %s", path, cfg.model.arch, tok.name, device)
    return model.eval(), cfg, tok
