"""``megarch-study``: run the study grid and write its report (tables, curves, speed-ups).

    megarch-study --pairs cd_flm,nd_mlm --steps 60 --adapt lm-a --adapt-steps 30 --mtf \
        --out study/tiny                                   # tiny: runs here, minutes on a CPU
    megarch-study --scale full --pairs cd_flm,nd_mlm,ed_mlm --adapt lm-a,nc-a --mtf \
        --steps 131072 --adapt-steps 39936 --mtf-steps 10000 --dry-run   # cluster commands

Unknown ``--section.field VALUE`` arguments are dotted overrides applied to every run
(e.g. ``--data.seq_len 64``). The report (``results.md``, ``results.json``, ``*.png``) goes to
``OUT/report``; see megarch.study.report. Exit status: 0 done, 2 bad arguments or data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

PROG = "megarch-study"


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=_list, default=["cd_flm", "nd_mlm"],
                        help="comma-separated pairs (cd_flm, cd_mlm, nd_plm, nd_mlm, ed_plm, "
                        "ed_mlm); default cd_flm,nd_mlm")
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny",
                        help="tiny: run here on the embedded corpus; full: the study's presets "
                        "(with --dry-run)")
    parser.add_argument("--steps", type=int, default=100, help="pretraining steps per pair")
    parser.add_argument("--adapt", type=_list, default=[],
                        help="adaptations: lm-a (from nd_mlm), nc-a (from cd_flm)")
    parser.add_argument("--adapt-steps", type=int, default=50,
                        help="steps of each adaptation after the pretraining steps")
    parser.add_argument("--mtf", action="store_true",
                        help="multitask-finetune every pretrained and adapted model")
    parser.add_argument("--mtf-steps", type=int, default=50, help="steps of each MTF run")
    parser.add_argument("--out", default="study/tiny", help="the study directory")
    parser.add_argument("--data-dir", default="data",
                        help="tiny: the embedded corpus directory (built on first use)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the megarch-train / megarch-eval commands and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megarch-study``; returns the exit status."""
    from megarch.config.overrides import ConfigError
    from megarch.data.errors import DataError
    from megarch.study.runner import StudySpec, command_lines, plan_study, run_study

    args, overrides = _parser().parse_known_args(argv)
    spec = StudySpec(pairs=args.pairs, scale=args.scale, steps=args.steps, adapt=args.adapt,
                     adapt_steps=args.adapt_steps, mtf=args.mtf, mtf_steps=args.mtf_steps,
                     out_dir=args.out, data_dir=args.data_dir, overrides=overrides)
    try:
        if args.dry_run:
            print("\n".join(command_lines(spec, plan_study(spec))))
            return 0
        from megarch.study.report import write_report
        from megarch.training.logging import setup_logging

        setup_logging(logging.WARNING if args.quiet else logging.INFO)
        start = time.perf_counter()
        results = run_study(spec)
        paths = write_report(results, os.path.join(args.out, "report"))
    except (ConfigError, DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(open(paths["results.md"], encoding="utf-8").read())
    print(f"study done in {time.perf_counter() - start:.0f} s; report: "
          f"{', '.join(sorted(paths.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
