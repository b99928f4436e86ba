"""The study's report: a results table (markdown and JSON), loss curves, speed-ups, accuracy bars.

:func:`write_report` writes into a directory:

- ``results.json``: the runs (validation loss, zero-shot accuracy per task and on average,
  tokens, seconds), the adaptation speed-ups and the commands that made them;
- ``results.md``: the same as tables;
- ``loss_curves.png``: training loss against tokens seen, one line per run;
- ``adaptation.png``: each adapted run against its from-scratch baseline, tokens counted from
  the start of each run, with the speed-up to reach the baseline's final loss;
- ``accuracy.png``: zero-shot accuracy (mean of per-task medians) per run.

Speed-up (:func:`speedup`): the tokens the from-scratch run needs to reach a loss, divided by
the tokens the adapted run needs (PAPER.md: LM-A 1.6x, NC-A 3.3x), linearly interpolated
between logged points (:func:`tokens_to_reach`).
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
    ``scratch``: ``{"target", "tokens_adapted", "tokens_scratch", "speedup"}`` (speedup None
    when the adapted run never reaches the target)."""
    target = scratch[-1][1] if target is None else target
    t_adapted, t_scratch = tokens_to_reach(adapted, target), tokens_to_reach(scratch, target)
    ratio = t_scratch / t_adapted if t_adapted and t_scratch is not None else None
    return {"target": target, "tokens_adapted": t_adapted, "tokens_scratch": t_scratch,
            "speedup": ratio}


def smooth(curve: Curve, window: int) -> Curve:
    """A trailing moving average of the losses over ``window`` points."""
    out, losses = [], []
    for tokens, loss in curve:
        losses = (losses + [loss])[-window:]
        out.append((tokens, sum(losses) / len(losses)))
    return out


def load_curve(out_dir: str) -> Curve:
    """(tokens, training loss) of a run's metrics.jsonl, tokens counted from the start of the
    run's own stage (an adapted run continues its parent's token count)."""
    from megarch.training.logging import read_metrics

    offset = 0
    checkpoint = find_latest(out_dir)
    lineage = read_lineage(checkpoint) if checkpoint else None
    if lineage:
        offset = lineage["stages"][-1]["start_tokens"]
    return [(r["tokens_seen"] - offset, r["loss"]) for r in read_metrics(out_dir)]


def adaptation_speedups(runs: list[dict], curves: dict[str, Curve]) -> list[dict[str, Any]]:
    """The speed-up of every adapted run that has a from-scratch baseline in ``runs``."""
    found = []
    for run in runs:
        if run["kind"] in ("lm-a", "nc-a") and run.get("baseline") in curves:
            window = max(1, len(curves[run["name"]]) // 10)
            measured = speedup(smooth(curves[run["name"]], window),
                               smooth(curves[run["baseline"]], window))
            found.append({"adapted": run["name"], "baseline": run["baseline"], **measured})
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
                  "| adapted | baseline | target loss | tokens adapted | tokens baseline | "
                  "speed-up |", "|---|---|---|---|---|---|"]
        for s in results["speedups"]:
            ratio = "not reached" if s["speedup"] is None else f"{s['speedup']:.2f}x"
            tokens = s["tokens_adapted"]
            reached = "not reached" if tokens is None else f"{tokens:,.0f}"
            lines.append(f"| {s['adapted']} | {s['baseline']} | {_fmt(s['target'])} | "
                         f"{reached} | {_fmt(s['tokens_scratch'], ',.0f')} | {ratio} |")
    return "\n".join(lines) + "\n"


def _plot_curves(curves: dict[str, Curve], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        if curve:
            ax.plot(*zip(*curve, strict=True), label=name)
    ax.set(xlabel="tokens seen (this stage)", ylabel="training loss", title="Loss per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_adaptation(speedups: list[dict], curves: dict[str, Curve], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(speedups)), figsize=(6 * max(1, len(speedups)), 4.5),
                             squeeze=False)
    for ax, s in zip(axes[0], speedups, strict=False):
        for name, style in ((s["baseline"], "--"), (s["adapted"], "-")):
            ax.plot(*zip(*curves[name], strict=True), style, label=name)
        ax.axhline(s["target"], color="grey", linewidth=0.8)
        ratio = "not reached" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        ax.set(xlabel="tokens since the run started", ylabel="training loss",
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
    curves = {r["name"]: load_curve(r["out_dir"]) for r in results["runs"]}
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
