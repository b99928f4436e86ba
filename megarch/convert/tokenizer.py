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


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: str) -> list[str]:
    """The files ``AutoTokenizer.from_pretrained(out_dir)`` reads for the run's tokenizer, so
    that its ids equal megarch's; return their names."""
    source = tokenizer.spec.partition("?")[0]
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(source, os.path.join(out_dir, "spiece.model"))
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": N_SENTINELS,
                  "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                  "model_max_length": 512, "legacy": True}
        names = ["spiece.model"]
    elif source.endswith(".json"):
        shutil.copyfile(source, os.path.join(out_dir, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "eos_token": tokenizer.decode([tokenizer.eos_id], show_special=True),
                  "pad_token": tokenizer.decode([tokenizer.pad_id], show_special=True)}
        names = ["tokenizer.json"]
    else:
        raise ConvertError(f"tokenizer {tokenizer.name}: only a SentencePiece .model or a "
                           "tokenizer.json exports to Hugging Face; pass one (--tokenizer PATH) "
                           "or --no-tokenizer")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return [*names, "tokenizer_config.json"]
