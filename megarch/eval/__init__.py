"""Zero-shot evaluation: rank classification on prompted tasks, aggregation, generation.

Public API (see each module):

- :func:`load_for_eval`, :class:`EvalError` (loading)
- :class:`Task`, :class:`Example`, :func:`load_task` (tasks: the jsonl task format)
- :func:`score_continuations`, :class:`ContinuationScore`, :func:`run_format`, :func:`start_id`
  (scoring: batched log-likelihoods; the input conventions of each training objective)
- :func:`rank_classify`, :class:`RankOptions`, :class:`TaskScores`, :func:`encode_pair`
  (rank_classification)
- :func:`aggregate`, :func:`format_table` (aggregate: T0-Eval's median over prompts, mean over
  tasks)
- :func:`generate`, :func:`generate_text`, :class:`GenerationOptions` (generation)

``megarch-eval`` (:mod:`megarch.eval.cli`) fronts them.
"""

from megarch.eval.aggregate import aggregate, format_table
from megarch.eval.generation import GenerationOptions, generate, generate_text
from megarch.eval.loading import EvalError, load_for_eval
from megarch.eval.rank_classification import RankOptions, TaskScores, encode_pair, rank_classify
from megarch.eval.scoring import ContinuationScore, run_format, score_continuations, start_id
from megarch.eval.tasks import Example, Task, load_task

__all__ = [
    "ContinuationScore",
    "EvalError",
    "Example",
    "GenerationOptions",
    "RankOptions",
    "Task",
    "TaskScores",
    "aggregate",
    "encode_pair",
    "format_table",
    "generate",
    "generate_text",
    "load_for_eval",
    "load_task",
    "rank_classify",
    "run_format",
    "score_continuations",
    "start_id",
]
