"""The study's report: a results table (markdown and JSON), loss curves, speed-ups, accuracy bars.

:func:`write_report` writes into a directory:

- ``results.json``: the runs (validation loss, zero-shot accuracy per task and on average,
  tokens, seconds), the adaptation speed-ups and the commands that made them;
- ``results.md``: the same as tables;
- ``loss_curves.png``: validation loss (points joined by lines) and training loss (faint)
  against tokens seen, one colour per run;
- ``adaptation.png``: each adapted run against its from-scratch baseline, tokens counted from
  the start of each run, with the speed-up to reach the baseline's final loss;
- ``accuracy.png``: zero-shot accuracy (mean of per-task medians) per run.

Speed-up (:func:`speedup`): the tokens the from-scratch run needs to reach a loss, divided by
the tokens the adapted run needs (PAPER.md: LM-A 1.6x, NC-A 3.3x), linearly interpolated
between logged points (:func:`tokens_to_reach`). As in the paper it is measured on validation
loss: the Trainer records one every ``run.eval_every`` steps and at the end of a run
(``{"step", "valid_loss", "valid_ce"}`` lines in ``metrics.jsonl``), placed at the tokens seen
by that step; the study also validates before each run's first step (``run.eval_at_start``),
the curve's point at 0 tokens. Only when the adapted run or its baseline has no validation
point does the report fall back to training loss (smoothed by a trailing moving average); each
speed-up says which loss it used (``"loss": "validation"`` or ``"training"``). Its resolution
is one validation interval. An adapted run already at the target before its first step has no
finite speed-up: it is reported as reached "at start" (``"at_start": true``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from megarch.training.checkpoint import find_latest, read_lineage

log = logging.getLogger(__name__)

Curve = list[tuple[float, float]]
"""(tokens, loss) points in increasing tokens."""


def tokens_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first tokens at which ``curve`` reaches ``target`` (interpolated between the last
    point above and the first at or below it); None if it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(tokens)
            t0, l0 = previous
            return float(t0 + (tokens - t0) * (l0 - target) / (l0 - loss))
        previous = (tokens, loss)
    return None


def speedup(adapted: Sequence[tuple[float, float]], scratch: Sequence[tuple[float, float]],
            target: float | None = None) -> dict[str, float | None]:
    """How much sooner ``adapted`` reaches ``target`` (default: ``scratch``'s final loss) than
    ``scratch``: ``{"target", "tokens_adapted", "tokens_scratch", "speedup", "at_start"}``
    (speedup None when the adapted run never reaches the target, or reaches it at 0 tokens:
    ``at_start``)."""
    target = scratch[-1][1] if target is None else target
    t_adapted, t_scratch = tokens_to_reach(adapted, target), tokens_to_reach(scratch, target)
    ratio = t_scratch / t_adapted if t_adapted and t_scratch is not None else None
    return {"target": target, "tokens_adapted": t_adapted, "tokens_scratch": t_scratch,
            "speedup": ratio, "at_start": t_adapted == 0.0}


def format_speedup(s: dict) -> str:
    """``1.60x``, ``at start`` (reached before any adapted token) or ``not reached``."""
    if s.get("at_start"):
        return "at start"
    return "not reached" if s["speedup"] is None else f"{s['speedup']:.2f}x"


def smooth(curve: Curve, window: int) -> Curve:
    """A trailing moving average of the losses over ``window`` points."""
    out, losses = [], []
    for tokens, loss in curve:
        losses = (losses + [loss])[-window:]
        out.append((tokens, sum(losses) / len(losses)))
    return out


def read_curves(out_dir: str) -> dict[str, Curve]:
    """A run's ``{"train": Curve, "valid": Curve}`` from its metrics.jsonl: (tokens, training
    loss) per step and (tokens, validation loss) per validation, tokens counted from the start
    of the run's own stage (an adapted run continues its parent's token count). A validation
    record sits at the tokens of the training step it follows."""
    from megarch.training.logging import METRICS_FILE

    offset = 0
    checkpoint = find_latest(out_dir)
    lineage = read_lineage(checkpoint) if checkpoint else None
    if lineage:
        offset = lineage["stages"][-1]["start_tokens"]
    tokens_at: dict[int, int] = {}
    train: Curve = []
    valid: Curve = []
    with open(os.path.join(out_dir, METRICS_FILE), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "loss" in record:
                tokens_at[record["step"]] = record["tokens_seen"]
                train.append((record["tokens_seen"] - offset, record["loss"]))
            elif "valid_loss" in record and record["step"] in tokens_at:
                valid.append((tokens_at[record["step"]] - offset, record["valid_loss"]))
            elif "valid_loss" in record and not train:  # before the run's first step
                valid.append((0, record["valid_loss"]))
    return {"train": train, "valid": valid}


def comparison_curves(adapted: dict[str, Curve], scratch: dict[str, Curve]
                      ) -> tuple[str, Curve, Curve]:
    """The loss to compare two runs on and their curves: ``("validation", valid, valid)``
    when both have validation points, else ``("training", smoothed, smoothed)`` (a trailing
    mean over a tenth of the adapted run's points)."""
    if adapted["valid"] and scratch["valid"]:
        return "validation", adapted["valid"], scratch["valid"]
    window = max(1, len(adapted["train"]) // 10)
    return "training", smooth(adapted["train"], window), smooth(scratch["train"], window)


def adaptation_speedups(runs: list[dict], curves: dict[str, dict[str, Curve]]
                        ) -> list[dict[str, Any]]:
    """The speed-up of every adapted run that has a from-scratch baseline in ``runs``, on
    validation loss (training loss when either run has no validation point); ``curves``
    maps run names to :func:`read_curves` results."""
    found = []
    for run in runs:
        if run["kind"] in ("lm-a", "nc-a") and run.get("baseline") in curves:
            loss, adapted, scratch = comparison_curves(curves[run["name"]],
                                                       curves[run["baseline"]])
            if not adapted or not scratch:
                continue
            if loss == "training":
                log.warning("%s vs %s: no validation losses (run.eval_batches 0?); the "
                            "speed-up is measured on training loss", run["name"],
                            run["baseline"])
            found.append({"adapted": run["name"], "baseline": run["baseline"], "loss": loss,
                          **speedup(adapted, scratch)})
    return found


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables: one row per run, then the speed-ups."""
    runs = results["runs"]
    tasks = sorted({t for r in runs for t in r.get("tasks", {})})
    head = ["run", "kind", "arch", "objective", "steps", "tokens", "valid loss",
            "zero-shot %", *[f"{t} %" for t in tasks], "seconds"]
    lines = ["# megarch study results", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in runs:
        accuracy = None if r.get("zero_shot") is None else 100 * r["zero_shot"]
        cells = [r["name"], r["kind"], r["arch"], r["objective"], str(r["steps"]),
                 f"{r['tokens']:,}", _fmt(r.get("valid_loss")), _fmt(accuracy, ".1f"),
                 *[_fmt(100 * r["tasks"][t], ".1f") if t in r.get("tasks", {}) else "n/a"
                   for t in tasks], _fmt(r.get("seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("speedups"):
        lines += ["", "## Adaptation speed-up (tokens to reach the baseline's final loss)", "",
                  "| adapted | baseline | loss | target loss | tokens adapted | "
                  "tokens baseline | speed-up |", "|---|---|---|---|---|---|---|"]
        for s in results["speedups"]:
            ratio = format_speedup(s)
            tokens = s["tokens_adapted"]
            reached = "not reached" if tokens is None else f"{tokens:,.0f}"
            lines.append(f"| {s['adapted']} | {s['baseline']} | {s.get('loss', 'training')} | "
                         f"{_fmt(s['target'])} | {reached} | "
                         f"{_fmt(s['tokens_scratch'], ',.0f')} | {ratio} |")
    return "\n".join(lines) + "\n"


def _plot_curves(curves: dict[str, dict[str, Curve]], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in curves.items():
        color = None
        if run["train"]:
            (line,) = ax.plot(*zip(*run["train"], strict=True), alpha=0.3, linewidth=0.8,
                              label=None if run["valid"] else f"{name} (training)")
            color = line.get_color()
        if run["valid"]:
            ax.plot(*zip(*run["valid"], strict=True), "o-", color=color, markersize=3,
                    label=f"{name} (validation)")
    ax.set(xlabel="tokens seen (this stage)", ylabel="loss",
           title="Validation loss per run (training loss faint)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_adaptation(speedups: list[dict], curves: dict[str, dict[str, Curve]],
                     path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(speedups)), figsize=(6 * max(1, len(speedups)), 4.5),
                             squeeze=False)
    for ax, s in zip(axes[0], speedups, strict=False):
        loss, adapted, scratch = comparison_curves(curves[s["adapted"]], curves[s["baseline"]])
        for name, curve, style in ((s["baseline"], scratch, "o--"), (s["adapted"], adapted, "o-")):
            ax.plot(*zip(*curve, strict=True), style, markersize=3, label=name)
        ax.axhline(s["target"], color="grey", linewidth=0.8)
        ratio = format_speedup(s)
        ax.set(xlabel="tokens since the run started", ylabel=f"{loss} loss",
               title=f"{s['adapted']} vs {s['baseline']}: {ratio}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_accuracy(runs: list[dict], path: str) -> None:
    import matplotlib.pyplot as plt

    scored = [r for r in runs if r.get("zero_shot") is not None]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(scored)), 4.5))
    ax.bar([r["name"] for r in scored], [100 * r["zero_shot"] for r in scored])
    ax.set(ylabel="zero-shot accuracy % (mean of task medians)", title="Zero-shot accuracy")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], directory: str) -> dict[str, str]:
    """Write results.json, results.md and the PNG plots for ``results`` (what
    :func:`megarch.study.runner.run_study` returns) into ``directory``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(directory, exist_ok=True)
    curves = {r["name"]: read_curves(r["out_dir"]) for r in results["runs"]}
    results["speedups"] = adaptation_speedups(results["runs"], curves)
    paths = {name: os.path.join(directory, name) for name in
             ("results.json", "results.md", "loss_curves.png", "accuracy.png")}
    with open(paths["results.json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(paths["results.md"], "w", encoding="utf-8") as f:
        f.write(markdown(results))
    _plot_curves(curves, paths["loss_curves.png"])
    _plot_accuracy(results["runs"], paths["accuracy.png"])
    if results["speedups"]:
        paths["adaptation.png"] = os.path.join(directory, "adaptation.png")
        _plot_adaptation(results["speedups"], curves, paths["adaptation.png"])
    log.info("wrote the study report in %s", directory)
    return paths
