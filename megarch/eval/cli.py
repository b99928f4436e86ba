"""``megarch-eval``: zero-shot rank classification of a checkpoint on jsonl tasks (T0-Eval).

    megarch-eval --checkpoint runs/cd_flm_tiny --tasks rte.jsonl cb.jsonl --output results.json

Prints one row per task (median accuracy over its prompts, min and max) and the mean of the
medians over tasks; ``--output`` writes the full results (per-prompt accuracies included) as
JSON. The task format is documented in :mod:`megarch.eval.tasks`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from megarch.eval.loading import EvalError

PROG = "megarch-eval"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a run's out_dir (its newest checkpoint)")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="JSONL",
                        help="task files (format: megarch.eval.tasks)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="(prompt, choice) pairs per forward pass (default 16)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--normalize", action="store_true",
                        help="rank by the mean log-probability per token instead of the sum")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--tokenizer", help="tokenizer spec overriding the run's")
    parser.add_argument("--max-len", type=int, default=None,
                        help="longest input; prompts are cut from the left (default: the run's)")
    parser.add_argument("--prompt-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="end prompts with EOS (default: as the run's training samples: "
                        "yes for mlm/multitask, no for flm/plm)")
    parser.add_argument("--choice-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="end choices with an EOS that is scored (default: yes)")
    parser.add_argument("--decoder-start", choices=("bos", "eos"), default=None,
                        help="decoder-only: the token before the prompt (default: bos for "
                        "mlm/multitask runs, eos for flm/plm)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no logs or progress bars")
    return parser


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise EvalError(f"--device {name!r}: use auto, cpu or cuda")
    return name


def run(args: argparse.Namespace) -> dict:
    """Evaluate as ``args`` say; return the results dict (see :func:`aggregate`)."""
    from megarch.atomic import atomic_file
    from megarch.data.errors import check_output_dir, make_output_dir
    from megarch.eval.aggregate import aggregate, format_table
    from megarch.eval.loading import load_for_eval
    from megarch.eval.rank_classification import RankOptions, rank_classify
    from megarch.eval.tasks import load_task

    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: must be >= 1")
    tasks = [load_task(path) for path in args.tasks]  # bad task files fail before the model
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"two task files share a name ({names}); rename one")
    if args.output:  # before the model is loaded and evaluated; created when writing
        check_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
    model, cfg, tokenizer = load_for_eval(args.checkpoint, _device(args.device), args.tokenizer)
    options = RankOptions.for_run(
        cfg, prompt_eos=args.prompt_eos, choice_eos=args.choice_eos,
        decoder_start=args.decoder_start, max_len=args.max_len or None,
        batch_size=args.batch_size, progress=not args.quiet,
    )
    accuracies, sizes = {}, {}
    for task in tasks:
        scores = rank_classify(model, tokenizer, task, options)
        accuracies[task.name] = scores.prompt_accuracies(args.normalize)
        sizes[task.name] = len(task.examples)
    results = aggregate(accuracies, sizes)
    results["settings"] = {
        "checkpoint": args.checkpoint, "arch": cfg.model.arch, "objective": cfg.data.objective,
        "normalize": args.normalize, "prompt_eos": options.prompt_eos,
        "choice_eos": options.choice_eos, "decoder_start": options.decoder_start,
        "max_len": options.max_len,
        "task_files": list(args.tasks),
    }
    print(format_table(results))
    if args.output:
        make_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
        with atomic_file(args.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.output}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megarch-eval``; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (ValueError, OSError) as err:  # DataError, ConfigError, EvalError included
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
