"""Small synthetic prompted data for a study at tiny scale: an MTF mixture and zero-shot tasks.

The MTF mixture (prompted ``{"inputs", "targets"}`` jsonl, preprocessed with
:func:`megarch.data.preprocess.preprocess`) and the evaluation tasks (the jsonl format of
:mod:`megarch.eval.tasks`) are made of different word games, so the evaluation stays zero-shot
(held-out tasks, as T0-Eval): finetuning on copying and sorting, evaluating on reversing and
picking the first word. All of it is deterministic in the seed.
"""

from __future__ import annotations

import json
import os
import random

from megarch.data.preprocess import preprocess

WORDS = ("red green blue black white cat dog bird fish horse one two three four five sun moon "
         "star rain snow").split()
"""The words every synthetic example is made of."""

MIXTURE = {"copy": 240, "sort": 80}
"""MTF datasets of the tiny mixture and their example counts (a cap below 240 matters)."""


def _words(rng: random.Random, n: int = 4) -> list[str]:
    return rng.sample(WORDS, n)


def _mixture_example(task: str, rng: random.Random) -> dict[str, str]:
    words = _words(rng)
    if task == "copy":
        return {"inputs": "Copy: " + " ".join(words), "targets": " ".join(words)}
    return {"inputs": "Sort: " + " ".join(words), "targets": " ".join(sorted(words))}


def write_mixture(directory: str, tokenizer: str, seed: int = 0) -> list[str]:
    """Write and preprocess the MTF datasets of :data:`MIXTURE`; their prefixes, in order."""
    os.makedirs(directory, exist_ok=True)
    prefixes = []
    for index, (task, count) in enumerate(MIXTURE.items()):
        rng = random.Random(seed * 1000 + index)
        prefix = os.path.join(directory, task)
        jsonl = prefix + ".jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for _ in range(count):
                f.write(json.dumps(_mixture_example(task, rng)) + "\n")
        if not os.path.exists(f"{prefix}_inputs_document.idx"):
            preprocess(jsonl, prefix, tokenizer, json_keys=("inputs", "targets"), progress=False)
        prefixes.append(prefix)
    return prefixes


def _reverse_example(rng: random.Random) -> dict:
    words = _words(rng)
    right, wrong = " ".join(reversed(words)), " ".join(words)
    label = rng.randrange(2)
    choices = [right, wrong] if label == 0 else [wrong, right]
    return {"template": ["Reverse: {w} =>", "Say {w} backwards:"], "fields": {"w": " ".join(words)},
            "choices": choices, "label": label}


def _first_word_example(rng: random.Random) -> dict:
    words = _words(rng, 3)
    label = rng.randrange(3)
    order = [words[(i - label) % 3] for i in range(3)]  # words[0] lands at index label
    return {"template": ["First word of: {w}?", "{w}. The first one is"],
            "fields": {"w": " ".join(words)}, "choices": order, "label": label}


def write_tasks(directory: str, examples: int = 24, seed: int = 0) -> list[str]:
    """Write the zero-shot tasks (reverse, first_word: two prompts each); their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for index, (name, make) in enumerate((("reverse", _reverse_example),
                                          ("first_word", _first_word_example))):
        rng = random.Random(seed * 1000 + 100 + index)
        path = os.path.join(directory, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(examples):
                f.write(json.dumps(make(rng)) + "\n")
        paths.append(path)
    return paths
