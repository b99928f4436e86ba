"""The study grid: pretrain pairs, adapt them, finetune them (MTF), evaluate them zero-shot.

A :class:`StudySpec` names the pairs (``cd_flm``, ``nd_mlm``, ... of
:data:`megarch.config.train.STUDY_PAIRS`), the steps of each stage, whether to adapt (``lm-a``
from ``nd_mlm``, ``nc-a`` from ``cd_flm``) and whether to multitask-finetune every model.
:func:`plan_study` turns it into :class:`RunPlan` s, each one ``megarch-train`` command.

- ``tiny``: :func:`run_study` runs the plans one after another in this process
  (:class:`~megarch.training.adapt.StagedTrainer`) on the embedded corpus, then scores every
  final checkpoint on small synthetic zero-shot tasks (:mod:`megarch.study.synthetic`) with
  megarch.eval's rank classification; minutes on one CPU.
- ``full``: the study's presets; :func:`command_lines` gives the ``megarch-train`` /
  ``megarch-eval`` commands to submit (through the ``launch/`` wrappers on a cluster), in order.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from megarch.config.overrides import ConfigError
from megarch.config.train import STUDY_PAIRS, load_train_config
from megarch.training.adapt import ADAPTATIONS, StagedTrainer, load_adapt_config

log = logging.getLogger(__name__)

SCALES = ("tiny", "full")
_PAIRS = {name: (arch, objective) for name, arch, objective in STUDY_PAIRS}
_SHORT = {"causal_decoder": "cd", "nonc_decoder": "nd", "encoder_decoder": "ed"}
ADAPT_SOURCE = {"lm-a": "nd_mlm", "nc-a": "cd_flm"}
"""The pair each adaptation starts from (PAPER.md)."""
ADAPT_BASELINE = {"lm-a": "cd_flm", "nc-a": "nd_mlm"}
"""The from-scratch pair each adaptation is compared with (same arch and objective)."""


@dataclass
class StudySpec:
    """What to run: pairs, stages, steps, scale and where."""

    pairs: list[str] = field(default_factory=lambda: ["cd_flm", "nd_mlm"])
    """Pretraining pairs (names of STUDY_PAIRS)."""
    scale: str = "tiny"
    """tiny (the <pair>_tiny presets, run here) or full (the study's presets, commands only)."""
    steps: int = 100
    """Pretraining steps per pair."""
    adapt: list[str] = field(default_factory=list)
    """Adaptations to run (lm-a needs nd_mlm in pairs, nc-a cd_flm)."""
    adapt_steps: int = 50
    """Steps of each adaptation, after the pretraining steps (the schedule continues)."""
    mtf: bool = False
    """Multitask-finetune every pretrained and adapted model."""
    mtf_steps: int = 50
    """Steps of each multitask finetuning (from step 0)."""
    out_dir: str = "study/tiny"
    """The study's directory: runs/, data/, tasks/ and the report."""
    data_dir: str = "data"
    """Tiny scale: the embedded corpus directory (built on first use)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides (``--section.field VALUE`` pairs) applied to every run."""

    def validate(self) -> StudySpec:
        """Refuse unknown pairs, scales and adaptations whose source pair is missing."""
        unknown = [p for p in self.pairs if p not in _PAIRS]
        if unknown or not self.pairs:
            raise ConfigError(f"study pairs {unknown or self.pairs}: use some of {list(_PAIRS)}")
        if self.scale not in SCALES:
            raise ConfigError(f"study scale {self.scale!r}: use one of {SCALES}")
        for kind in self.adapt:
            if kind not in ADAPTATIONS:
                raise ConfigError(f"study adaptation {kind!r}: use one of {list(ADAPTATIONS)}")
            if ADAPT_SOURCE[kind] not in self.pairs:
                raise ConfigError(f"{kind} adapts {ADAPT_SOURCE[kind]}: add it to the pairs")
        if min(self.steps, self.adapt_steps, self.mtf_steps) < 1:
            raise ConfigError("study steps, adapt_steps and mtf_steps must be >= 1")
        return self


@dataclass
class RunPlan:
    """One run of the grid: a ``megarch-train`` command and what it is in the study."""

    name: str
    """The run's name (its directory under runs/)."""
    kind: str
    """pretrain, lm-a, nc-a or mtf."""
    arch: str
    """The model's arch."""
    objective: str
    """The data objective."""
    args: list[str]
    """megarch-train arguments (dotted overrides included)."""
    out_dir: str
    """The run's out_dir."""
    parent: str | None = None
    """The run it starts from (adaptation, MTF)."""
    baseline: str | None = None
    """Adaptation: the from-scratch run of the same arch and objective, if in the grid."""

    def command(self) -> str:
        """The shell command of this run."""
        return shlex.join(["megarch-train", *self.args])


VALIDATIONS_PER_STAGE = 10
"""Tiny scale: validation losses per stage (the report's speed-ups are measured on them)."""


def _stage_overrides(spec: StudySpec, steps: int, out_dir: str, stage_steps: int) -> list[str]:
    """Arguments ending a stage at step ``steps`` after ``stage_steps`` steps of its own; at
    tiny scale it validates about :data:`VALIDATIONS_PER_STAGE` times (steps are counted
    across stages, so an adapted run validates at multiples of eval_every past its parent's
    last step)."""
    args = ["--run.steps", str(steps), "--run.out_dir", out_dir]
    if spec.scale == "tiny":
        every = max(1, stage_steps // VALIDATIONS_PER_STAGE)
        args += ["--run.eval_every", str(every), "--run.eval_batches", "2",
                 "--run.eval_at_start", "true",
                 "--run.save_every", "0", "--run.log_every", str(max(1, stage_steps // 5))]
    return args + spec.overrides


def _tiny_data(spec: StudySpec) -> list[str]:
    return ["--data.paths", os.path.join(spec.data_dir, "stdlib"),
            "--data.tokenizer", os.path.join(spec.data_dir, "stdlib_sp.model")]


def mixture_dir(spec: StudySpec) -> str:
    """Where the tiny MTF mixture is written."""
    return os.path.join(spec.out_dir, "data", "mtf")


def _mtf_plan(spec: StudySpec, parent: RunPlan) -> RunPlan:
    from megarch.study.synthetic import MIXTURE

    name = f"{parent.name}_mtf"
    out = os.path.join(spec.out_dir, "runs", name)
    preset = f"{_SHORT[parent.arch]}_mtf" + ("_tiny" if spec.scale == "tiny" else "")
    args = ["--preset", preset, "--run.init_from", parent.out_dir]
    if spec.scale == "tiny":
        paths = [os.path.join(mixture_dir(spec), task) for task in MIXTURE]
        args += ["--data.paths", ",".join(paths), "--data.tokenizer",
                 os.path.join(spec.data_dir, "stdlib_sp.model"), "--data.mixture_cap", "160"]
    return RunPlan(name, "mtf", parent.arch, "multitask",
                   args + _stage_overrides(spec, spec.mtf_steps, out, spec.mtf_steps), out,
                   parent.name)


def plan_study(spec: StudySpec) -> list[RunPlan]:
    """The runs of ``spec`` in an order that respects their dependencies."""
    spec.validate()
    suffix = "_tiny" if spec.scale == "tiny" else ""
    plans: list[RunPlan] = []
    for pair in spec.pairs:
        out = os.path.join(spec.out_dir, "runs", pair)
        data = _tiny_data(spec) if spec.scale == "tiny" else []
        args = ["--preset", pair + suffix, *data,
                *_stage_overrides(spec, spec.steps, out, spec.steps)]
        plans.append(RunPlan(pair, "pretrain", *_PAIRS[pair], args, out))
    for plan in plans:  # a bad --section.field fails here, before any run (or a dry run)
        load_train_config(plan.args[1], None, plan.args[2:])
    by_name = {p.name: p for p in plans}
    for kind in spec.adapt:
        source, adaptation = by_name[ADAPT_SOURCE[kind]], ADAPTATIONS[kind]
        name = f"{source.name}_{kind}"
        out = os.path.join(spec.out_dir, "runs", name)
        args = ["--adapt", kind, "--run.init_from", source.out_dir,
                *_stage_overrides(spec, spec.steps + spec.adapt_steps, out,
                                 spec.adapt_steps)]
        baseline = ADAPT_BASELINE[kind] if ADAPT_BASELINE[kind] in by_name else None
        plans.append(RunPlan(name, kind, adaptation.target_arch, adaptation.target_objective,
                             args, out, source.name, baseline))
    if spec.mtf:
        plans += [_mtf_plan(spec, p) for p in list(plans)]
    return plans


def command_lines(spec: StudySpec, plans: list[RunPlan]) -> list[str]:
    """The shell commands of the study: each run, then the zero-shot evaluation of each."""
    lines = [p.command() for p in plans]
    tasks = os.path.join(spec.out_dir, "tasks", "*.jsonl")
    for plan in plans:
        output = os.path.join(spec.out_dir, "eval", f"{plan.name}.json")
        lines.append(f"megarch-eval --checkpoint {shlex.quote(plan.out_dir)} --tasks {tasks} "
                     f"--output {shlex.quote(output)}")
    return lines


def train_plan(plan: RunPlan):
    """Run ``plan`` here (as ``megarch-train`` would); its TrainResult."""
    if plan.args[0] == "--adapt":
        cfg = load_adapt_config(plan.args[1], plan.args[2:])
    else:
        cfg = load_train_config(plan.args[1], None, plan.args[2:])
    return StagedTrainer(cfg).train()


def zero_shot(checkpoint: str, task_paths: list[str]) -> dict[str, Any]:
    """Rank-classification accuracy of ``checkpoint`` on the tasks (megarch.eval.aggregate)."""
    from megarch.eval import RankOptions, aggregate, load_for_eval, load_task, rank_classify

    model, cfg, tokenizer = load_for_eval(checkpoint, "cpu")
    options = RankOptions.for_run(cfg, batch_size=32)
    accuracies, sizes = {}, {}
    for path in task_paths:
        task = load_task(path)
        accuracies[task.name] = rank_classify(model, tokenizer, task, options).prompt_accuracies()
        sizes[task.name] = len(task.examples)
    return aggregate(accuracies, sizes)


def prepare_data(spec: StudySpec) -> list[str]:
    """Tiny scale: the embedded corpus, the MTF mixture (if asked) and the zero-shot tasks;
    the task files."""
    from megarch.data.embedded import prepare_embedded
    from megarch.study.synthetic import write_mixture, write_tasks

    _, tokenizer = prepare_embedded(spec.data_dir, progress=False)
    if spec.mtf:
        write_mixture(mixture_dir(spec), tokenizer)
    return write_tasks(os.path.join(spec.out_dir, "tasks"))


def run_study(spec: StudySpec) -> dict[str, Any]:
    """Run the tiny grid here, sequentially; the results (see :mod:`megarch.study.report`)."""
    if spec.scale != "tiny":
        raise ConfigError("a full-scale study runs on a cluster: use --dry-run for its commands")
    plans = plan_study(spec)
    from megarch.data.errors import make_output_dir

    make_output_dir(spec.out_dir, "--out")  # before the data is built and any run starts
    tasks = prepare_data(spec)
    rows = []
    for index, plan in enumerate(plans, 1):
        log.info("study run %d/%d: %s", index, len(plans), plan.command())
        start = time.perf_counter()
        result = train_plan(plan)
        seconds = time.perf_counter() - start
        scores = zero_shot(result.checkpoint, tasks)
        rows.append({
            "name": plan.name, "kind": plan.kind, "arch": plan.arch,
            "objective": plan.objective, "parent": plan.parent, "baseline": plan.baseline,
            "steps": result.state.step, "tokens": result.state.tokens_seen,
            "final_loss": result.final_loss, "valid_loss": result.valid_loss,
            "zero_shot": scores["average"],
            "tasks": {name: t["median"] for name, t in scores["tasks"].items()},
            "seconds": round(seconds, 2), "out_dir": plan.out_dir,
            "checkpoint": result.checkpoint,
        })
    return {"spec": asdict(spec), "runs": rows, "commands": command_lines(spec, plans)}
