"""P3 folders -> T0's MTF mixture as prompted jsonl, and T0's eval tasks as megarch-eval tasks.

The P3 layout (bigscience/P3 on the Hugging Face hub: ``data/{task}/`` per (dataset, prompt)):
each task folder is a seqio cache, ``{split}.tfrecord-00000-of-00001`` (``-NNNNN-of-NNNNN``
shards in general) of ``tf.train.Example`` records, ``info.{split}.json`` (features, shards),
``stats.{split}.json`` and a ``COMPLETED`` marker. Features: ``inputs_pretokenized`` and
``targets_pretokenized`` (the prompted text), ``inputs`` / ``targets`` (T5 token ids, unused
here), ``answer_choices`` in folders of prompts with fixed choices; ``_score_eval`` folders hold
one record per (example, choice) with ``idx`` = [example, choice], ``is_correct`` and
``weight``. Confirmed from public code that reads P3 (found with the search tool): seqio / t5's
cache naming (``info.{split}.json``, ``stats.{split}.json``, ``{split}.tfrecord``), a P3 reader
in HazyResearch/ama_prompting (``download_p3.py``: the ``{split}.tfrecord-00000-of-00001`` path
and the feature names, ``idx`` / ``is_correct`` / ``weight`` included), a BigScience download
script of the same cached tasks, and t-zero's ``tasks.py`` (task naming, T0's mixture). The
``COMPLETED`` marker and the ``examples`` count in ``stats.{split}.json`` are seqio's cache
conventions as described to us, not confirmed there: a missing marker is only reported, and
the count is checked only when present.

:func:`prepare_p3` writes into ``out_dir``:

- ``mtf/{dataset}.jsonl``: every training-split example of every prompt of the dataset, one
  ``{"inputs": ..., "targets": ...}`` line each (whitespace stripped), prompts in name order --
  what ``megarch-data preprocess --json-keys inputs targets`` reads. With
  ``data.mixture_cap 500000`` megarch samples each dataset by its line count capped at 500k.
  (T0's seqio mixture rated each prompt by the dataset's size, capped at 500k / prompts, so
  its weights differ from ours for datasets whose size times prompts exceeds 500k.)
- ``tasks/{dataset}.jsonl``: one line per example of the evaluation split, in megarch-eval's
  task format (megarch.eval.tasks): every prompt's rendered input and answer choices and the
  label, prompts in name order. A prompt counts if it has labelled answer choices, as many as
  most of the dataset's prompts (a yes/no question about one candidate ending is another
  task); the others are listed in the summary.
- ``mtf_data.json`` (the ``data`` section for ``megarch-train --config``) and ``summary.json``
  (counts, prompts, what was not found or skipped, the commands to run next).

Alignment of an evaluation example across prompts: example ``i`` is record ``i`` of each
prompt's plain folder, or the records with ``idx[0] == i`` of its ``_score_eval`` folder (used
when the plain folder has no ``answer_choices``). P3 rendered every prompt from the same
dataset split in the same order, so row ``i`` is the same source example for every prompt,
unless a prompt dropped examples it could not render, which would shift the rows: hence every
prompt of a dataset must have the same number of examples (DataError listing the counts
otherwise). The label is the choice equal to the target (the ``is_correct`` one); when prompts
place the correct choice at different indices, a prompt's choices are reordered (two swapped)
so that one label holds for all, which rank classification does not notice.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import multiprocessing
import os
import shlex
import shutil
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from megarch.atomic import atomic_file
from megarch.data.errors import DataError, make_output_dir
from megarch.data.p3.tables import EVAL_SUITES, EXCLUDED, MIXTURES, SCORE_EVAL, match_folders
from megarch.data.p3.tfrecord import read_examples
from megarch.data.preprocess import pool_start_method

log = logging.getLogger(__name__)

TEXT_FEATURES = ("inputs_pretokenized", "targets_pretokenized")
EVAL_FEATURES = (*TEXT_FEATURES, "answer_choices", "idx", "is_correct")
MIXTURE_CAP = 500_000
"""T0's cap on examples per dataset in its mixture (PAPER.md)."""


class UnusablePrompt(DataError):
    """A prompt whose records cannot be ranked (no label among its choices): skipped and
    reported, not fatal."""


def p3_data_dir(p3_dir: str) -> str:
    """The folder holding P3's task folders: ``p3_dir/data`` when it exists (a clone of the
    P3 repository), else ``p3_dir`` itself; DataError if neither exists."""
    nested = os.path.join(p3_dir, "data")
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(p3_dir):
        return p3_dir
    raise DataError(f"--p3-dir {p3_dir}: not a directory; give the P3 download (the folder "
                    "holding data/, or data/ itself)")


def split_files(folder: str, split: str) -> list[str]:
    """The TFRecord shards of ``split`` in ``folder``, in shard order."""
    return sorted(glob.glob(os.path.join(folder, f"{split}.tfrecord-*-of-*")))


def _examples(folder: str, split: str, features, verify: bool) -> Iterator[dict[str, list]]:
    for path in split_files(folder, split):
        yield from read_examples(path, features, verify)


def _text(example: dict[str, list], name: str, where: str) -> str:
    values = example.get(name)
    if not values:
        raise DataError(f"{where}: no {name!r} feature; is this a P3 task folder?")
    try:
        return values[0].decode("utf-8").strip()
    except (AttributeError, UnicodeDecodeError):
        raise DataError(f"{where}: feature {name!r} is not UTF-8 text") from None


def _check_count(folder: str, split: str, count: int) -> None:
    """DataError when ``stats.{split}.json`` records another number of examples (a file cut
    at a record boundary reads cleanly otherwise)."""
    path = os.path.join(folder, f"stats.{split}.json")
    try:
        with open(path, encoding="utf-8") as f:
            expected = json.load(f).get("examples")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(expected, int) and expected != count:
        raise DataError(f"{folder}: {count} {split} records, but {path} says {expected}; the "
                        "download is incomplete: download the folder again")


def convert_train_folder(folder: str, split: str, out_path: str, verify: bool = True
                         ) -> dict[str, int]:
    """Write the (inputs, targets) jsonl lines of one prompt's ``split`` to ``out_path``;
    ``{"examples": written, "empty": skipped for an empty input or target}``."""
    written = empty = index = 0
    with atomic_file(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for index, example in enumerate(_examples(folder, split, TEXT_FEATURES, verify), 1):
            where = f"{folder}: {split} record {index - 1}"
            inputs = _text(example, "inputs_pretokenized", where)
            targets = _text(example, "targets_pretokenized", where)
            if not inputs or not targets:
                empty += 1
                continue
            f.write(json.dumps({"inputs": inputs, "targets": targets}, ensure_ascii=False))
            f.write("\n")
            written += 1
    _check_count(folder, split, index)
    return {"examples": written, "empty": empty}


def _plain_prompt(folder: str, split: str, verify: bool) -> list[tuple[str, list[str], int]]:
    """(input, choices, label) per example of a plain folder; [] if it has no answer choices."""
    out = []
    for index, example in enumerate(_examples(folder, split, EVAL_FEATURES, verify)):
        where = f"{folder}: {split} record {index}"
        if "answer_choices" not in example:
            return []
        choices = [c.decode("utf-8").strip() for c in example["answer_choices"]]
        target = _text(example, "targets_pretokenized", where)
        if target not in choices:
            raise UnusablePrompt(f"{split} record {index}: the target {target!r} is not one "
                                 f"of the answer choices {choices} (a split without labels?)")
        out.append((_text(example, "inputs_pretokenized", where), choices,
                    choices.index(target)))
    _check_count(folder, split, len(out))
    return out


def _score_eval_prompt(folder: str, split: str, verify: bool
                       ) -> list[tuple[str, list[str], int]]:
    """(input, choices, label) per example of a ``_score_eval`` folder (records grouped by
    ``idx[0]``, choices in ``idx[1]`` order, the label the ``is_correct`` one)."""
    grouped: dict[int, list[tuple[int, str, str, bool]]] = {}
    count = 0
    for count, example in enumerate(_examples(folder, split, EVAL_FEATURES, verify), 1):
        where = f"{folder}: {split} record {count - 1}"
        idx, correct = example.get("idx", []), example.get("is_correct", [])
        if len(idx) != 2 or len(correct) != 1:
            raise DataError(f"{where}: a _score_eval record needs idx [example, choice] and "
                            "is_correct")
        grouped.setdefault(idx[0], []).append(
            (idx[1], _text(example, "inputs_pretokenized", where),
             _text(example, "targets_pretokenized", where), bool(correct[0])))
    _check_count(folder, split, count)
    if sorted(grouped) != list(range(len(grouped))):
        raise DataError(f"{folder}: example indices (idx[0]) are not 0..{len(grouped) - 1}; "
                        "the folder is incomplete: download it again")
    out = []
    for i in range(len(grouped)):
        rows = sorted(grouped[i])
        labels = [k for k, row in enumerate(rows) if row[3]]
        if len(labels) != 1:
            raise UnusablePrompt(f"{folder}: example {i} has {len(labels)} correct choices, "
                                 "not 1 (a split without labels?)")
        out.append((rows[0][1], [row[2] for row in rows], labels[0]))
    return out


def read_eval_prompt(folders: list[str], split: str, verify: bool = True
                     ) -> tuple[list[tuple[str, list[str], int]], str | None]:
    """One prompt's examples as (input, choices, label), from its plain folder (with
    ``answer_choices``) or else its ``_score_eval`` copy, and None; or ``([], why)`` when
    neither gives labelled choices (corrupt files still raise)."""
    plain = [f for f in folders if not f.endswith(SCORE_EVAL) and split_files(f, split)]
    scored = [f for f in folders if f.endswith(SCORE_EVAL) and split_files(f, split)]
    why = f"no {split} split with answer choices"
    try:
        if plain:
            examples = _plain_prompt(plain[0], split, verify)
            if examples:
                return examples, None
        if scored:
            return _score_eval_prompt(scored[0], split, verify), None
    except UnusablePrompt as err:
        why = str(err)
    return [], why


def keep_usual_choice_count(name: str, prompts: dict[str, list], skipped: list[str]
                            ) -> dict[str, list]:
    """The prompts of dataset ``name`` whose first example has the number of choices most of
    its prompts have; the others (a yes/no question about one candidate ending, say: another
    task on the same examples) are appended to ``skipped`` with the reason."""
    counts = {prompt: len(examples[0][1]) for prompt, examples in prompts.items()}
    usual = collections.Counter(counts.values()).most_common(1)[0][0]
    for prompt in sorted(prompts):
        if counts[prompt] != usual:
            skipped.append(f"{name} prompt {prompt}: {counts[prompt]} answer choices where the "
                           f"dataset's other prompts have {usual}")
    return {prompt: examples for prompt, examples in prompts.items() if counts[prompt] == usual}


def align_prompts(name: str, prompts: dict[str, list[tuple[str, list[str], int]]]
                  ) -> list[dict[str, Any]]:
    """Task records (megarch.eval.tasks format) of dataset ``name`` from each prompt's
    examples (module docstring: alignment); DataError if the prompts disagree on the number
    of examples or of choices."""
    counts = {prompt: len(examples) for prompt, examples in prompts.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"eval dataset {name}: its prompts have different numbers of examples "
                        f"{counts}, so examples cannot be aligned by position; remove or "
                        "download again the folders that disagree")
    names = sorted(prompts)
    records = []
    for i in range(counts[names[0]]):
        label = prompts[names[0]][i][2]
        texts, choice_lists = [], []
        for prompt in names:
            text, choices, correct = prompts[prompt][i]
            if len(choices) != len(prompts[names[0]][i][1]):
                raise DataError(f"eval dataset {name}: example {i} has "
                                f"{len(prompts[names[0]][i][1])} choices under prompt "
                                f"{names[0]} but {len(choices)} under {prompt}")
            choices = list(choices)
            choices[label], choices[correct] = choices[correct], choices[label]
            texts.append(text)
            choice_lists.append(choices)
        records.append({"id": i, "prompts": texts, "choices": choice_lists, "label": label})
    return records


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _run_units(fn, units: list[tuple], workers: int, desc: str, progress: bool) -> list:
    """``fn(*unit)`` for every unit, in a pool of ``workers`` processes; results in order."""
    bar = tqdm(total=len(units), desc=desc, unit="prompt", disable=not progress)
    try:
        if workers <= 1 or len(units) <= 1:
            results = []
            for unit in units:
                results.append(fn(*unit))
                bar.update()
            return results
        # fork on Linux: the workers only read files, parse and write json (see there)
        context = multiprocessing.get_context(pool_start_method())
        with context.Pool(min(workers, len(units))) as pool:
            pending = [pool.apply_async(fn, unit, callback=lambda _: bar.update())
                       for unit in units]
            return [p.get() for p in pending]
    finally:
        bar.close()


def _prepare_train(data_dir: str, folders: list[str], mixture: str, out_dir: str, split: str,
                   workers: int, verify: bool, progress: bool, report: dict) -> None:
    """Write ``mtf/{dataset}.jsonl`` for every dataset of ``mixture`` found in P3."""
    mtf_dir = os.path.join(out_dir, "mtf")
    parts_dir = os.path.join(mtf_dir, ".parts")
    os.makedirs(parts_dir, exist_ok=True)
    excluded = EXCLUDED.get(mixture, frozenset())
    found = match_folders(folders, MIXTURES[mixture])
    units, owners = [], []
    for dataset, prompts in found.items():
        usable = []
        for _, prompt_folders in sorted(prompts.items()):
            plain = [f for f in prompt_folders if not f.endswith(SCORE_EVAL)]
            if plain and plain[0] in excluded:
                report["skipped_prompts"].append(f"{plain[0]}: left out of {mixture} by T0")
                continue
            if not plain:
                continue
            if not split_files(os.path.join(data_dir, plain[0]), split):
                report["skipped_prompts"].append(f"{plain[0]}: no {split} split")
                continue
            usable.append(plain[0])
        if not usable:
            report["missing"].append(f"{mixture}: {dataset} (no P3 folder {dataset}_* with a "
                                     f"{split} split)")
            continue
        for folder in usable:
            units.append((os.path.join(data_dir, folder), split,
                          os.path.join(parts_dir, f"{folder}.jsonl"), verify))
            owners.append((dataset, folder))
    try:
        results = _run_units(convert_train_folder, units, workers, f"{mixture} ({split})",
                             progress)
    except BaseException:  # a corrupt file: no partial conversions left behind
        shutil.rmtree(parts_dir, ignore_errors=True)
        raise
    by_dataset: dict[str, list[tuple[str, dict, str]]] = {}
    for (dataset, folder), unit, result in zip(owners, units, results, strict=True):
        by_dataset.setdefault(dataset, []).append((folder, result, unit[2]))
    for dataset, parts in by_dataset.items():
        path = os.path.join(mtf_dir, f"{dataset}.jsonl")
        examples = sum(r["examples"] for _, r, _ in parts)
        if not examples:  # nothing to train on: not part of the mixture
            for _, _, part in parts:
                os.remove(part)
            empty = sum(r["empty"] for _, r, _ in parts)
            report["missing"].append(f"{mixture}: {dataset} (its {split} records hold no "
                                     f"example with a target; {empty} empty skipped)")
            continue
        with atomic_file(path) as tmp, open(tmp, "wb") as out:
            for _, _, part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 20):
                        out.write(chunk)
        for _, _, part in parts:
            os.remove(part)
        report["mtf"][dataset] = {
            "file": path, "examples": examples,
            "empty_skipped": sum(r["empty"] for _, r, _ in parts),
            "prompts": [folder for folder, _, _ in parts]}
    shutil.rmtree(parts_dir, ignore_errors=True)


def _prepare_eval(data_dir: str, folders: list[str], suite: str, out_dir: str, split: str,
                  workers: int, verify: bool, progress: bool, report: dict) -> None:
    """Write ``tasks/{dataset}.jsonl`` for every dataset of ``suite`` found in P3."""
    tasks_dir = os.path.join(out_dir, "tasks")
    os.makedirs(tasks_dir, exist_ok=True)
    found = match_folders(folders, EVAL_SUITES[suite])
    units, owners = [], []
    for dataset, prompts in found.items():
        if not prompts:
            report["missing"].append(f"{suite}: {dataset} (no P3 folder matches "
                                     f"{_pattern(suite, dataset)})")
            continue
        for prompt, prompt_folders in sorted(prompts.items()):
            units.append(([os.path.join(data_dir, f) for f in prompt_folders], split, verify))
            owners.append((dataset, prompt))
    results = _run_units(read_eval_prompt, units, workers, f"{suite} ({split})", progress)
    by_dataset: dict[str, dict[str, list]] = {}
    for (dataset, prompt), unit, (examples, why) in zip(owners, units, results, strict=True):
        if examples:
            by_dataset.setdefault(dataset, {})[prompt] = examples
        else:
            why = why or f"no {split} examples"
            report["skipped_prompts"].append(f"{os.path.basename(unit[0][0])}: {why}")
    for dataset in found:
        if dataset not in by_dataset:
            if found[dataset]:
                report["missing"].append(f"{suite}: {dataset} (no prompt with answer choices "
                                         f"and a {split} split)")
            continue
        prompts = keep_usual_choice_count(dataset, by_dataset[dataset],
                                          report["skipped_prompts"])
        records = align_prompts(dataset, prompts)
        path = os.path.join(tasks_dir, f"{dataset}.jsonl")
        _write_jsonl(path, records)
        report["tasks"][dataset] = {"file": path, "examples": len(records),
                                    "prompts": sorted(prompts)}


def _pattern(suite: str, dataset: str) -> str:
    entry = next(d for d in EVAL_SUITES[suite] if d.name == dataset)
    return f"{entry.prefix}*{entry.suffix}"


def next_commands(out_dir: str, report: dict) -> list[str]:
    """The commands that take the written files to a finetuned, evaluated model."""
    lines = []
    for dataset, entry in report["mtf"].items():
        lines.append(shlex.join([
            "megarch-data", "preprocess", "--input", entry["file"], "--output",
            os.path.join(out_dir, "tokenized", dataset), "--json-keys", "inputs", "targets",
            "--tokenizer", "TOKENIZER"]))
    if report["mtf"]:
        lines.append(shlex.join(["megarch-train", "--preset", "nd_mtf", "--config",
                                 os.path.join(out_dir, "mtf_data.json"), "--run.init_from",
                                 "CHECKPOINT"]))
    if report["tasks"]:
        lines.append("megarch-eval --checkpoint CHECKPOINT --tasks "
                     + " ".join(shlex.quote(t["file"]) for t in report["tasks"].values()))
    return lines


def prepare_p3(p3_dir: str, out_dir: str, mixture: str | None = "t0_train",
               eval_suite: str | None = "t0_eval", workers: int = 1,
               train_split: str = "train", eval_split: str = "validation",
               verify: bool = True, progress: bool = True) -> dict[str, Any]:
    """Write T0's MTF mixture and eval tasks from a P3 download (module docstring); the
    summary (also in ``out_dir/summary.json``). ``mixture`` / ``eval_suite`` None skip that
    part. What P3 lacks is listed under ``"missing"`` and ``"skipped_prompts"``; corrupt
    files raise DataError naming the file and record."""
    if mixture is not None and mixture not in MIXTURES:
        raise DataError(f"--mixture {mixture}: use one of {sorted(MIXTURES)}")
    if eval_suite is not None and eval_suite not in EVAL_SUITES:
        raise DataError(f"--eval {eval_suite}: use one of {sorted(EVAL_SUITES)}")
    data_dir = p3_data_dir(p3_dir)
    folders = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if not folders:
        raise DataError(f"{data_dir}: no P3 task folders; download bigscience/P3 (its data/ "
                        "folder) and pass it with --p3-dir")
    created = not os.path.exists(out_dir)
    make_output_dir(out_dir, "--out")
    try:
        return _prepare_into(data_dir, folders, out_dir, mixture, eval_suite, train_split,
                             eval_split, workers, verify, progress)
    except BaseException:
        _remove_empty_dirs(out_dir, remove_top=created)
        raise


def _remove_empty_dirs(top: str, remove_top: bool) -> None:
    """Remove the empty directories under ``top`` (and ``top`` itself when asked and empty)."""
    for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        if (folder != top or remove_top) and not os.listdir(folder):
            os.rmdir(folder)


def _prepare_into(data_dir: str, folders: list[str], out_dir: str, mixture: str | None,
                  eval_suite: str | None, train_split: str, eval_split: str, workers: int,
                  verify: bool, progress: bool) -> dict[str, Any]:
    """:func:`prepare_p3` once its inputs are checked and ``out_dir`` exists."""
    report: dict[str, Any] = {"p3_dir": data_dir, "mixture": mixture, "eval": eval_suite,
                              "train_split": train_split, "eval_split": eval_split,
                              "mtf": {}, "tasks": {}, "missing": [], "skipped_prompts": []}
    if mixture is not None:
        _prepare_train(data_dir, folders, mixture, out_dir, train_split, workers, verify,
                       progress, report)
    if eval_suite is not None:
        _prepare_eval(data_dir, folders, eval_suite, out_dir, eval_split, workers, verify,
                      progress, report)
    used = {f for entry in report["mtf"].values() for f in entry["prompts"]}
    report["incomplete"] = sorted(f for f in used if not os.path.exists(
        os.path.join(data_dir, f, "COMPLETED")))
    paths = [os.path.join(out_dir, "tokenized", d) for d in report["mtf"]]
    report["config"] = {"data": {"objective": "multitask", "paths": paths,
                                 "mixture_cap": MIXTURE_CAP}}
    report["commands"] = next_commands(out_dir, report)
    if report["mtf"]:
        _write_json(os.path.join(out_dir, "mtf_data.json"), report["config"])
    _write_json(os.path.join(out_dir, "summary.json"), report)
    log.info("P3 -> %s: %d training datasets, %d eval tasks, %d not found", out_dir,
             len(report["mtf"]), len(report["tasks"]), len(report["missing"]))
    return report


def _write_json(path: str, value: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def format_summary(report: dict[str, Any]) -> str:
    """The summary for people: what was written, what is missing, what to run next."""
    lines = []
    for dataset, entry in report["mtf"].items():
        lines.append(f"mtf   {dataset:28s} {entry['examples']:>10,} examples, "
                     f"{len(entry['prompts'])} prompts")
    for dataset, entry in report["tasks"].items():
        lines.append(f"eval  {dataset:28s} {entry['examples']:>10,} examples, "
                     f"{len(entry['prompts'])} prompts")
    if report["missing"]:
        lines += ["", f"not found ({len(report['missing'])}):"]
        lines += [f"  {m}" for m in report["missing"]]
    if report["skipped_prompts"]:
        lines += ["", f"prompts skipped ({len(report['skipped_prompts'])}):"]
        lines += [f"  {m}" for m in report["skipped_prompts"]]
    if report.get("incomplete"):
        lines += ["", "folders without a COMPLETED marker (read anyway; CRCs checked):"]
        lines += [f"  {m}" for m in report["incomplete"]]
    if report["commands"]:
        lines += ["", "next (TOKENIZER: a .model; CHECKPOINT: a pretrained run):"]
        lines += [f"  {c}" for c in report["commands"]]
    return "\n".join(lines)
