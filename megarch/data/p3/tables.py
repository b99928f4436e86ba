"""T0's training mixture and held-out evaluation tasks, as P3 folder names.

P3 names each cached (dataset, prompt) task ``{dataset}_{subset}_{prompt}`` (``{dataset}_{prompt}``
without a subset), every character other than letters, digits, ``.`` and ``_`` replaced by
``_``; a rank-classification copy of an evaluation prompt adds ``_score_eval``. ANLI is the
exception: its round goes last (``anli_{prompt}_r1``). So a dataset is a folder-name prefix
(and, for ANLI, a suffix); the prompt is what lies between.

The lists follow T0 (Sanh et al., 2021) as its seqio task definitions give them
(t-zero's ``t0/seqio_tasks/tasks.py``: ``t0_train["BASE"]`` and ``t0_eval["BASE"]``); PAPER.md
calls the training mixture P3 "d4_train".
"""

from __future__ import annotations

from dataclasses import dataclass

SCORE_EVAL = "_score_eval"
"""Suffix of P3's rank-classification copy of a prompt (one record per answer choice)."""


@dataclass(frozen=True)
class P3Dataset:
    """One dataset of a mixture or evaluation suite, found in P3 by folder name."""

    name: str
    """megarch's name for it: the output file name."""
    prefix: str
    """P3 folder names of its prompts start with this."""
    suffix: str = ""
    """... and end with this (ANLI's round), before any ``_score_eval``."""

    def prompt_of(self, folder: str) -> str | None:
        """The prompt name of P3 folder ``folder`` (``_score_eval`` removed) if it belongs to
        this dataset, else None."""
        base = folder[: -len(SCORE_EVAL)] if folder.endswith(SCORE_EVAL) else folder
        if (base.startswith(self.prefix) and base.endswith(self.suffix)
                and len(base) > len(self.prefix) + len(self.suffix)):
            return base[len(self.prefix): len(base) - len(self.suffix)]
        return None


def _datasets(*prefixes: str) -> tuple[P3Dataset, ...]:
    return tuple(P3Dataset(prefix.rstrip("_"), prefix) for prefix in prefixes)


T0_TRAIN = _datasets(
    # multiple-choice QA
    "cos_e_v1.11_", "cosmos_qa_", "dream_", "qasc_", "quail_", "quarel_", "quartz_", "sciq_",
    "social_i_qa_", "wiki_hop_original_", "wiqa_",
    # extractive QA
    "adversarial_qa_dbidaf_", "adversarial_qa_dbert_", "adversarial_qa_droberta_",
    "duorc_SelfRC_", "duorc_ParaphraseRC_", "ropes_", "quoref_",
    # closed-book QA
    "kilt_tasks_hotpotqa_", "wiki_qa_",
    # structure to text
    "common_gen_", "wiki_bio_",
    # sentiment
    "amazon_polarity_", "app_reviews_", "imdb_", "rotten_tomatoes_", "yelp_review_full_",
    # summarization
    "cnn_dailymail_3.0.0_", "gigaword_", "multi_news_", "samsum_", "xsum_",
    # topic classification
    "ag_news_", "dbpedia_14_", "trec_",
    # paraphrase identification
    "glue_mrpc_", "glue_qqp_", "paws_labeled_final_",
)
"""T0's training mixture: 38 datasets (subsets counted apart), every prompt of each."""

T0_TRAIN_EXCLUDED = frozenset({"gigaword_summarize_"})
"""Prompt folders T0 left out of its mixture (its task blacklist: a broken cache)."""

T0_EVAL = (
    P3Dataset("anli_r1", "anli_", "_r1"),
    P3Dataset("anli_r2", "anli_", "_r2"),
    P3Dataset("anli_r3", "anli_", "_r3"),
    P3Dataset("cb", "super_glue_cb_"),
    P3Dataset("rte", "super_glue_rte_"),
    P3Dataset("copa", "super_glue_copa_"),
    P3Dataset("hellaswag", "hellaswag_"),
    P3Dataset("story_cloze", "story_cloze_2016_"),
    P3Dataset("winogrande", "winogrande_winogrande_xl_"),
    P3Dataset("wsc", "super_glue_wsc.fixed_"),
    P3Dataset("wic", "super_glue_wic_"),
)
"""T0's held-out evaluation: 11 datasets (PAPER.md's T0-Eval), each with all its prompts that
have answer choices (megarch.data.p3.prepare says which count)."""

MIXTURES = {"t0_train": T0_TRAIN}
"""Training mixtures by ``--mixture`` name."""
EVAL_SUITES = {"t0_eval": T0_EVAL}
"""Evaluation suites by ``--eval`` name."""
EXCLUDED = {"t0_train": T0_TRAIN_EXCLUDED}
"""Prompt folders left out of each mixture."""


def match_folders(folders: list[str], datasets: tuple[P3Dataset, ...]
                  ) -> dict[str, dict[str, list[str]]]:
    """``{dataset name: {prompt: [folders]}}`` for the P3 ``folders`` that belong to one of
    ``datasets`` (a prompt's plain folder and its ``_score_eval`` copy, sorted); the longest
    matching prefix wins when two datasets could claim a folder."""
    found: dict[str, dict[str, list[str]]] = {d.name: {} for d in datasets}
    ranked = sorted(datasets, key=lambda d: len(d.prefix) + len(d.suffix), reverse=True)
    for folder in sorted(folders):
        for dataset in ranked:
            prompt = dataset.prompt_of(folder)
            if prompt is not None:
                found[dataset.name].setdefault(prompt, []).append(folder)
                break
    return found
