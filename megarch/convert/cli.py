"""``megarch-convert``: Hugging Face T5 directories to megarch checkpoints and back.

Usage::

    megarch-convert from-hf HF_DIR OUT [--tokenizer FILE]
    megarch-convert to-hf CHECKPOINT OUT [--max-shard-size 5GB] [--tokenizer FILE]

``from-hf`` reads a local ``save_pretrained`` directory (config.json and model.safetensors,
sharded safetensors with an index, or pytorch_model.bin) and writes ``OUT`` as a megarch run
directory: ``OUT/checkpoints/step_00000000`` (written by megarch.training.checkpoint, as
training writes it) and the tokenizer (``OUT/spiece.model``), which the checkpoint's
``data.tokenizer`` names, and ``OUT/model_config.json`` (the model section and tokenizer).
``megarch-eval --checkpoint OUT``, ``load_for_eval(OUT)`` and multitask finetuning
``megarch-train --preset ed_mtf --config OUT/model_config.json --run.init_from OUT ...`` use it
directly. Its config is the study's ED span-corruption preset (``ed_mlm``) with the T5 model;
a Gemma directory (``model_type`` gemma, megarch.convert.hf_gemma) imports as a rotary causal
decoder with the ``cd_flm`` preset.

``to-hf`` reads a megarch checkpoint or run directory (its newest checkpoint; any TP/PP layout)
and writes config.json, generation_config.json, safetensors (sharded with an index above
``--max-shard-size``) and the run's tokenizer, which ``T5ForConditionalGeneration`` and
``AutoTokenizer`` load with ``from_pretrained(OUT)``. Encoder-decoders export as T5 (they need
``model.rel_bias_shared``, as imported T5s and the T5 v1.1 presets have it); a causal decoder
with rotary positions exports as Gemma (megarch.convert.hf_gemma); other decoder-only models
are refused.

Both write into a temporary directory beside ``OUT`` and rename it at the end: on any error
nothing is left. An existing non-empty ``OUT`` is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys

import torch

from megarch.convert.hf_gemma import (
    check_gemma_exportable,
    gemma_config,
    gemma_to_megarch,
    megarch_to_gemma,
    model_config_from_gemma,
)
from megarch.convert.hf_t5 import (
    ConvertError,
    check_exportable,
    hf_config_from_model,
    hf_to_megarch,
    megarch_to_hf,
    model_config_from_hf,
    read_hf_config,
)
from megarch.convert.tokenizer import (
    copy_tokenizer,
    find_hf_tokenizer,
    load_checked,
    write_hf_tokenizer,
)
from megarch.convert.weights import HFWeights, write_sharded

PROG = "megarch-convert"
MODEL_CONFIG = "model_config.json"
"""Written by from-hf beside the checkpoint: the model section and the tokenizer, for
``megarch-train --preset ed_mtf --config OUT/model_config.json --run.init_from OUT``."""
DEFAULT_SHARD = "5GB"
log = logging.getLogger(__name__)


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConvertError(f"{out} exists and is not empty: pass a new directory")


class _Staging:
    """A temporary directory beside ``out``, renamed to ``out`` on success, removed otherwise."""

    def __init__(self, out: str):
        _check_out(out)
        self.out = os.path.abspath(out)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = f"{self.out}.tmp-convert-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # empty (checked), so the rename can take its place
        os.rename(self.tmp, self.out)


def parse_size(text: str) -> int:
    """``"5GB"``, ``"200MB"``, ``"1000"`` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConvertError(f"--max-shard-size {text!r}: use e.g. 5GB, 200MB or a byte count")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
             "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])


def from_hf(hf_dir: str, out: str, tokenizer: str | None = None) -> str:
    """Convert HF T5 (or Gemma) directory ``hf_dir`` into megarch run directory ``out``;
    return ``out``."""
    from megarch.config.train import get_train_preset
    from megarch.model import build_model
    from megarch.training.checkpoint import TrainState, save_checkpoint
    from megarch.training.optim import build_optimizer

    _check_out(out)
    hf = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    gemma = hf.get("model_type") == "gemma"  # a causal decoder; else a T5
    model_cfg = (model_config_from_gemma if gemma else model_config_from_hf)(hf, where)
    weights = HFWeights(hf_dir)
    tok_path = tokenizer or find_hf_tokenizer(hf_dir)
    if tok_path is None:
        raise ConvertError(f"{hf_dir}: no tokenizer (spiece.model or tokenizer.json); pass "
                           "the model's tokenizer file with --tokenizer PATH")
    load_checked(tok_path, model_cfg.vocab_size, hf_dir)
    state = (gemma_to_megarch if gemma else hf_to_megarch)(model_cfg, weights.get, hf_dir)
    with torch.device("meta"):
        model = build_model(model_cfg, device="meta")
    model.load_state_dict(state, strict=True, assign=True)  # no second copy of the weights
    # T5 was pretrained with span corruption, Gemma with next-token prediction
    objective = "flm" if gemma else "mlm"
    cfg = get_train_preset("cd_flm" if gemma else "ed_mlm")
    cfg.model = model_cfg
    final = os.path.abspath(out)
    cfg.data.tokenizer = os.path.join(final, os.path.basename(tok_path))
    cfg.run.out_dir = final
    cfg.validate()
    source = os.path.abspath(hf_dir)
    lineage = {"stages": [{"stage": "pretrain", "arch": model_cfg.arch, "objective": objective,
                           "out_dir": source, "from_checkpoint": None, "from_step": None,
                           "start_step": 0, "end_step": 0, "start_tokens": 0, "tokens": 0,
                           "imported_from": source}],
               "tokens_by_objective": {}}
    with _Staging(out) as tmp:
        copy_tokenizer(tok_path, tmp)
        save_checkpoint(tmp, TrainState(), model, build_optimizer(cfg.optim, model),
                        cfg.to_json(), lineage=lineage)
        with open(os.path.join(tmp, MODEL_CONFIG), "w", encoding="utf-8") as f:
            json.dump({"model": dataclasses.asdict(model_cfg),
                       "data": {"tokenizer": cfg.data.tokenizer}}, f, indent=2)
        with open(os.path.join(tmp, "hf_source.json"), "w", encoding="utf-8") as f:
            json.dump({"from": source, "config": hf}, f, indent=2)
    log.info("wrote %s", final)
    return final


def _resolve(checkpoint: str) -> str:
    from megarch.training.checkpoint import STATE_FILE, find_latest

    if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
        return checkpoint
    base = checkpoint
    if os.path.basename(os.path.normpath(checkpoint)) == "checkpoints":
        base = os.path.dirname(os.path.normpath(checkpoint))
    latest = find_latest(base) if os.path.isdir(base) else None
    if latest is None:
        raise ConvertError(f"{checkpoint}: neither a megarch checkpoint (no {STATE_FILE}) nor "
                           "a run directory with one; pass a checkpoint or a run's out_dir")
    return latest


def to_hf(checkpoint: str, out: str, max_shard_bytes: int = 5 * 10**9,
          tokenizer: str | None = None, with_tokenizer: bool = True) -> str:
    """Export megarch checkpoint (or run directory) ``checkpoint`` to HF directory ``out``."""
    from megarch.config.train import config_from_json
    from megarch.training.checkpoint import CONFIG_FILE
    from megarch.training.resume import load_model

    _check_out(out)
    path = _resolve(checkpoint)
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            cfg = config_from_json(f.read())
    except (OSError, ValueError) as err:
        raise ConvertError(f"{path}/{CONFIG_FILE}: cannot read the run's config ({err})") \
            from None
    decoder_only = not cfg.model.is_encoder_decoder
    if decoder_only:  # before any weight is read
        check_gemma_exportable(cfg.model)
    else:
        check_exportable(cfg.model)
        if not cfg.model.rel_bias_shared:
            raise ConvertError(f"{path}: model.rel_bias_shared=false (a bias table per layer); "
                               "T5 has one per stack, so only models trained with "
                               "model.rel_bias_shared=true export exactly")
    tok = None
    if with_tokenizer:
        spec = tokenizer or cfg.data.tokenizer
        if spec != "bytes" and not os.path.exists(spec.partition("?")[0]):
            raise ConvertError(f"the run's tokenizer {spec!r} (data.tokenizer) was not found; "
                               "pass it with --tokenizer PATH (or --no-tokenizer)")
        tok = load_checked(spec, cfg.model.vocab_size, path)
    model, _ = load_model(path)
    state = model.state_dict()
    pad, eos = (tok.pad_id, tok.eos_id) if tok is not None else (0, 1)
    if decoder_only:
        entries = megarch_to_gemma(cfg.model, state)
        hf_cfg = gemma_config(cfg.model, pad_id=pad, eos_id=eos)
        generation = {"bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad}
    else:
        entries = megarch_to_hf(cfg.model, state)
        hf_cfg = hf_config_from_model(cfg.model, pad_id=pad, eos_id=eos)
        generation = {"decoder_start_token_id": pad, "eos_token_id": eos, "pad_token_id": pad}
    with _Staging(out) as tmp:
        if tok is not None:
            write_hf_tokenizer(tok, tmp)
        write_sharded(tmp, entries, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
    log.info("wrote %s", os.path.abspath(out))
    return os.path.abspath(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF T5 directory -> megarch run directory")
    a.add_argument("hf_dir")
    a.add_argument("out")
    a.add_argument("--tokenizer", help="tokenizer file (default: the one in HF_DIR)")
    b = sub.add_parser("to-hf", help="megarch checkpoint or run directory -> HF directory")
    b.add_argument("checkpoint")
    b.add_argument("out")
    b.add_argument("--max-shard-size", default=DEFAULT_SHARD,
                   help=f"largest safetensors file before sharding (default {DEFAULT_SHARD})")
    b.add_argument("--tokenizer", help="tokenizer file (default: the run's data.tokenizer)")
    b.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    for p in (a, b):
        p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megarch-convert``; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "from-hf":
            out = from_hf(args.hf_dir, args.out, args.tokenizer)
            usage = (f"  finetune : megarch-train --preset ed_mtf --config {out}/{MODEL_CONFIG} "
                     f"--run.init_from {out} --data.paths ...\n"
                     f"  evaluate : megarch-eval --checkpoint {out} --tasks ...")
        else:
            out = to_hf(args.checkpoint, args.out, parse_size(args.max_shard_size),
                        args.tokenizer, not args.no_tokenizer)
            usage = f"  load     : from_pretrained({out!r}) (transformers)"
    except (ValueError, OSError) as err:  # ConvertError, ConfigError, DataError included
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        size = sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(out) for f in files)
        print(f"wrote {out} ({size / 1e6:.1f} MB)\n{usage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
