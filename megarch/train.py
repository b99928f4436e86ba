"""``megarch-train``: train one model from a preset, a JSON config and dotted overrides.

    megarch-train --preset cd_flm_tiny                      # the embedded corpus, ~1 minute on CPU
    megarch-train --preset ed_mlm_tiny --run.steps 50 --model.n_layers 4
    megarch-train --preset cd_flm --config cluster.json --data.paths data/c4
    python -m megarch.train --list-presets
    megarch-train --preset cd_mtf_tiny --run.init_from runs/cd_flm_tiny --data.paths a,b  # MTF
    megarch-train --adapt nc-a --run.init_from runs/cd_flm --run.steps 171008  # adaptation

The resolved config is printed first and saved beside every checkpoint. A run resumes from the
newest complete checkpoint in ``run.out_dir`` by default (``--run.resume none`` starts afresh).
``--adapt lm-a|nc-a`` takes the config of the ``--run.init_from`` checkpoint, switches only
the attention mask (model.arch) and the objective, writes to ``<its out_dir>_<kind>`` and
continues its step, optimizer and schedule (``--adapt-reset-schedule``: step 0, fresh optimizer);
see megarch.training.adapt. Every checkpoint records its lineage (``lineage.json``).
SIGTERM or Ctrl-C saves a checkpoint at the end of the current step and exits 0.
Exit status: 0 done (or stopped by a signal after saving), 1 non-finite loss, 2 bad config/data,
3 a peer rank stopped answering for ``parallel.timeout_s`` (megarch.parallel.watchdog).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megarch.config.overrides import ConfigError
from megarch.config.train import TRAIN_PRESETS, TrainConfig, load_train_config
from megarch.data.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megarch-train",
        description="Train one model from a preset, a JSON config and dotted overrides.",
        epilog="Any field is set with --<section>.<field> VALUE, sections: model, data, optim, "
        "run, parallel (e.g. --run.steps 50 --model.n_layers 4 --optim.lr 1e-3).",
    )
    parser.add_argument("--preset", default=None,
                        help=f"a training preset: {', '.join(TRAIN_PRESETS)}")
    parser.add_argument("--config", default=None, help="a JSON file of sections to apply")
    parser.add_argument("--adapt", choices=("lm-a", "nc-a"), default=None,
                        help="adapt the --run.init_from checkpoint: lm-a (ND+MLM -> CD+FLM) or "
                        "nc-a (CD+FLM -> ND+MLM); its config is the base, not a preset")
    parser.add_argument("--adapt-reset-schedule", action="store_true",
                        help="with --adapt: start at step 0 with a fresh optimizer instead of "
                        "continuing the checkpoint's step and schedule")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no config dump and only warnings")
    return parser


def _summary(result) -> str:
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    valid = f"{result.valid_loss:.4f}" if result.valid_loss is not None else "n/a"
    lines = [
        "stopped by signal after saving" if result.stopped_by_signal else "training done",
        f"  steps       : {result.state.step} ({result.state.skipped_steps} skipped)",
        f"  tokens seen : {result.state.tokens_seen:,}",
        f"  final loss  : {final} (valid {valid})",
        f"  checkpoint  : {result.checkpoint}",
        f"  tensorboard : tensorboard --logdir {result.tensorboard_dir}",
    ]
    return "\n".join(lines)


def _load_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    """The run's config: a preset, file and overrides; or with --adapt, the checkpoint's."""
    if args.adapt is None:
        if args.adapt_reset_schedule:
            raise ConfigError("--adapt-reset-schedule applies only with --adapt lm-a|nc-a")
        return load_train_config(args.preset, args.config, overrides)
    if args.preset:
        raise ConfigError(f"--adapt {args.adapt} takes its config from the --run.init_from "
                          "checkpoint: drop --preset (override fields with --section.field)")
    from megarch.training.adapt import load_adapt_config

    return load_adapt_config(args.adapt, overrides, args.config, args.adapt_reset_schedule)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megarch-train``; returns the exit status."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.list_presets:
        print("\n".join(TRAIN_PRESETS))
        return 0
    from megarch.training.logging import setup_logging

    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        cfg = _load_config(args, overrides)
        from megarch.data.errors import check_output_dir

        check_output_dir(cfg.run.out_dir, "--run.out_dir")  # before any data or model is built
        from megarch.training.adapt import StagedTrainer
        from megarch.training.loop import NonFiniteError

        trainer = StagedTrainer(cfg)  # resolves what depends on the data (model.vocab_size 0)
        if not args.quiet:
            print(f"config (preset {args.preset or 'none'}):\n{cfg.to_json()}", flush=True)
        try:
            result = trainer.train()
        except NonFiniteError as err:
            print(f"megarch-train: stopped: {err}", file=sys.stderr)
            return 1
        except RuntimeError as err:  # a failed collective: name the rank that stopped answering
            if trainer.ctx.watchdog is not None:
                trainer.ctx.watchdog.explain(err)
            raise
    except (ConfigError, DataError) as err:
        print(f"megarch-train: error: {err}", file=sys.stderr)
        return 2
    print(_summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
