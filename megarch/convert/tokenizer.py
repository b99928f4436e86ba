"""Tokenizers across the bridge: an HF T5 tokenizer becomes a megarch run's, and back.

megarch's SentencePiece tokenizer already follows T5's layout (pad 0, EOS 1, unk 2, the 100
sentinels ``<extra_id_k>`` virtually above the pieces with ``<extra_id_0>`` at the top), which
is exactly what ``T5Tokenizer(extra_ids=100)`` builds from the same ``spiece.model``. So the
bridge copies the file and, on export, writes the ``tokenizer_config.json`` that makes
``AutoTokenizer`` build T5's tokenizer from it. A ``tokenizer.json`` run tokenizer is copied as
is (its sentinels, if any, are in it).
"""

from __future__ import annotations

import json
import os
import shutil

from megarch.convert.hf_t5 import ConvertError
from megarch.data.errors import DataError
from megarch.data.tokenizers import (
    DIRECTORY_FILES,
    N_SENTINELS,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)


def find_hf_tokenizer(hf_dir: str) -> str | None:
    """The tokenizer file of an HF model directory (spiece.model first), or None."""
    for name in DIRECTORY_FILES:
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            return path
    return None


def load_checked(path: str, vocab_size: int, where: str) -> Tokenizer:
    """megarch's tokenizer of file ``path``, refused when the model's ``vocab_size`` embedding
    rows cannot hold its ids."""
    try:
        tokenizer = load_tokenizer(path)
    except DataError as err:
        raise ConvertError(str(err)) from None
    if tokenizer.vocab_size > vocab_size:
        raise ConvertError(
            f"{where}: the tokenizer {path} has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary is {vocab_size}: this is not the model's tokenizer; pass the right one "
            "(--tokenizer PATH)")
    return tokenizer


def copy_tokenizer(path: str, out_dir: str) -> str:
    """Copy tokenizer file ``path`` into ``out_dir`` (same name); return the copy's path."""
    target = os.path.join(out_dir, os.path.basename(path))
    shutil.copyfile(path, target)
    return target


def _uses_byte_fallback(tokenizer: SentencePieceTokenizer) -> bool:
    sp = tokenizer._sp
    return any(sp.is_byte(i) for i in range(sp.get_piece_size()))


T5_CONFIG = {"tokenizer_class": "T5Tokenizer", "extra_ids": N_SENTINELS, "eos_token": "</s>",
             "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512}


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def _byte_fallback_json(out_dir: str) -> None:
    """``tokenizer.json`` of T5's tokenizer with byte fallback on: transformers'
    ``T5Tokenizer`` always builds its Unigram model without it, so a SentencePiece model that
    has it (megarch-data train-tokenizer's) would give unk where megarch gives byte pieces."""
    from tokenizers import decoders
    from tokenizers.models import Unigram

    from megarch.convert.hf_t5 import import_transformers

    hf = import_transformers().AutoTokenizer.from_pretrained(out_dir)  # T5's own conversion
    backend = hf.backend_tokenizer
    vocab = json.loads(backend.to_str())["model"]["vocab"]
    backend.model = Unigram([tuple(v) for v in vocab], unk_id=2, byte_fallback=True)
    backend.decoder = decoders.Sequence([
        decoders.ByteFallback(),
        decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    backend.save(os.path.join(out_dir, "tokenizer.json"))


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: str) -> list[str]:
    """The files ``AutoTokenizer.from_pretrained(out_dir)`` reads for the run's tokenizer, so
    that its ids equal megarch's; return their names."""
    source = tokenizer.spec.partition("?")[0]
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(source, os.path.join(out_dir, "spiece.model"))
        _write_json(config_path, T5_CONFIG)
        if not _uses_byte_fallback(tokenizer):
            return ["spiece.model", "tokenizer_config.json"]
        _byte_fallback_json(out_dir)
        sentinels = [f"<extra_id_{k}>" for k in range(N_SENTINELS)]
        _write_json(config_path, {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "eos_token": "</s>", "pad_token": "<pad>",
                                  "unk_token": "<unk>", "model_max_length": 512,
                                  "additional_special_tokens": sentinels})
        return ["spiece.model", "tokenizer.json", "tokenizer_config.json"]
    if source.endswith(".json"):
        shutil.copyfile(source, os.path.join(out_dir, "tokenizer.json"))
        _write_json(config_path, {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": tokenizer.decode([tokenizer.eos_id], show_special=True),
            "pad_token": tokenizer.decode([tokenizer.pad_id], show_special=True)})
        return ["tokenizer.json", "tokenizer_config.json"]
    raise ConvertError(f"tokenizer {tokenizer.name}: only a SentencePiece .model or a "
                       "tokenizer.json exports to Hugging Face; pass one (--tokenizer PATH) "
                       "or --no-tokenizer")
