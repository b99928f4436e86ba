"""T0-Eval aggregation: accuracy per prompt, median over a task's prompts, mean over tasks.

The study (PAPER.md) reports, for each dataset, the median accuracy over its crowd-sourced
prompts, and the mean of those medians over datasets. :func:`aggregate` builds that as a plain,
JSON-able dict; :func:`format_table` renders it for people. Accuracies are fractions in [0, 1]
in the dict and percentages in the table.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def aggregate(prompt_accuracies: Mapping[str, Sequence[float]],
              n_examples: Mapping[str, int] | None = None) -> dict:
    """The results dict of tasks' per-prompt accuracies.

    Args:
        prompt_accuracies: task name -> the accuracy of each of its prompts.
        n_examples: task name -> number of examples (recorded when given).

    Returns ``{"tasks": {name: {"prompt_accuracies", "median", "min", "max", "n_prompts"
    [, "n_examples"]}}, "average": mean of the medians, "n_tasks"}`` (statistics.median: the
    mean of the two middle values for an even number of prompts).
    """
    tasks: dict[str, dict] = {}
    for name, accuracies in prompt_accuracies.items():
        accuracies = [float(a) for a in accuracies]
        if not accuracies:
            raise ValueError(f"task {name!r} has no prompt accuracies")
        tasks[name] = {
            "prompt_accuracies": accuracies,
            "median": statistics.median(accuracies),
            "min": min(accuracies),
            "max": max(accuracies),
            "n_prompts": len(accuracies),
        }
        if n_examples is not None and name in n_examples:
            tasks[name]["n_examples"] = int(n_examples[name])
    average = statistics.fmean(t["median"] for t in tasks.values()) if tasks else float("nan")
    return {"tasks": tasks, "average": average, "n_tasks": len(tasks)}


def format_table(results: Mapping) -> str:
    """A text table of :func:`aggregate`'s dict: one row per task, then the average."""
    header = ("task", "prompts", "examples", "median %", "min %", "max %")
    rows = [
        (name, str(t["n_prompts"]), str(t.get("n_examples", "")), f"{100 * t['median']:.1f}",
         f"{100 * t['min']:.1f}", f"{100 * t['max']:.1f}")
        for name, t in results["tasks"].items()
    ]
    rows.append(("average (mean of medians)", "", "", f"{100 * results['average']:.1f}", "",
                 ""))
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])
