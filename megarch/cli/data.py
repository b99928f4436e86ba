"""``megarch-data``: build the embedded corpus, train a tokenizer, preprocess, merge, inspect,
prepare P3.

Each subcommand is a thin front over megarch.data; ``megarch-data demo`` runs the whole data
path on the embedded corpus (the standard library's docstrings) in well under a minute.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megarch.config.data import DataConfig
from megarch.config.overrides import ConfigError, apply_overrides
from megarch.data.errors import DataError

DEMO_OBJECTIVES = (
    ("flm", "decoder"),
    ("plm", "decoder"),
    ("plm", "encoder_decoder"),
    ("mlm", "decoder"),
    ("mlm", "encoder_decoder"),
)


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the option in its message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _corpus(args: argparse.Namespace) -> None:
    from megarch.data.corpus import build_stdlib_corpus

    summary = build_stdlib_corpus(args.output, min_chars=args.min_chars, max_docs=args.max_docs,
                                  progress=not args.quiet)
    print(f"wrote {args.output}: {summary['docs']:,} documents, {summary['chars']:,} characters "
          f"from {summary['files']:,} source files")


def _train_tokenizer(args: argparse.Namespace) -> None:
    from megarch.data.tokenizers import load_tokenizer, train_sentencepiece

    path = train_sentencepiece(args.input, args.output, vocab_size=args.vocab_size, key=args.key,
                               model_type=args.model_type, progress=not args.quiet)
    tok = load_tokenizer(path)
    print(f"wrote {path}: vocab {tok.vocab_size} (pad {tok.pad_id}, eos {tok.eos_id}, "
          f"sentinels <extra_id_0>={tok.sentinel_id(0)} .. <extra_id_99>={tok.sentinel_id(99)})")


def _preprocess(args: argparse.Namespace) -> None:
    from megarch.data.preprocess import preprocess

    summary = preprocess(
        args.input, args.output, args.tokenizer, json_keys=tuple(args.json_keys),
        workers=args.workers, append_eos=not args.no_eos, skip_bad_lines=args.skip_bad_lines,
        dtype=args.dtype, progress=not args.quiet,
    )
    print(summary.format())


def _merge(args: argparse.Namespace) -> None:
    from megarch.data.indexed_dataset import merge_datasets

    merged = merge_datasets(args.input, args.output)
    print(f"wrote {args.output}: {merged.num_documents:,} documents, "
          f"{int(merged.document_lengths.sum()):,} tokens")


def _inspect(args: argparse.Namespace, overrides: list[str]) -> None:
    from megarch.data.datasets import build_dataset
    from megarch.data.inspect import render_json, render_text
    from megarch.data.tokenizers import load_tokenizer

    cfg = apply_overrides(DataConfig(), overrides, prefix="data")
    tokenizer = load_tokenizer(cfg.tokenizer)
    dataset = build_dataset(cfg, tokenizer, args.split, args.start + args.count)
    title = f"{cfg.objective} · {cfg.layout} · {args.split}"
    for index in range(args.start, args.start + args.count):
        sample = dataset[index]
        if args.json:
            print(render_json(index, sample))
        else:
            print(render_text(index, sample, tokenizer.decode, title))


def _p3(args: argparse.Namespace) -> None:
    from megarch.data.p3 import format_summary, prepare_p3

    report = prepare_p3(
        args.p3_dir, args.out, mixture=None if args.mixture == "none" else args.mixture,
        eval_suite=None if args.eval == "none" else args.eval, workers=args.workers,
        train_split=args.train_split, eval_split=args.eval_split, verify=not args.no_crc,
        progress=not args.quiet,
    )
    print(format_summary(report))
    print(f"\nwrote {args.out}/summary.json")


def _demo(args: argparse.Namespace) -> None:
    """The embedded corpus end to end: corpus -> tokenizer -> dataset -> a sample per objective."""
    from megarch.data.datasets import build_dataset
    from megarch.data.embedded import embedded_paths, prepare_embedded
    from megarch.data.inspect import render_text
    from megarch.data.tokenizers import load_tokenizer

    prefix, model = prepare_embedded(args.dir, vocab_size=args.vocab_size, workers=args.workers,
                                     progress=not args.quiet)
    print(f"corpus    : {embedded_paths(args.dir)[0]}")
    print(f"tokenizer : {model}")
    print(f"dataset   : {prefix}_text_document.{{bin,idx}}")
    tokenizer = load_tokenizer(model)
    for objective, layout in DEMO_OBJECTIVES:
        cfg = DataConfig(paths=[prefix], tokenizer=model, objective=objective, layout=layout,
                         seq_len=args.seq_len)
        dataset = build_dataset(cfg, tokenizer, "train", None)
        print()
        print(render_text(0, dataset[0], tokenizer.decode, f"{objective} · {layout}"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarch-data", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return add_parser(name, parents=[common], **kwargs)

    p = add("corpus", help="write the embedded corpus (stdlib docstrings) as jsonl")
    p.add_argument("--output", default="data/stdlib.jsonl")
    p.add_argument("--min-chars", type=_at_least(0), default=200, help="shortest docstring kept")
    p.add_argument("--max-docs", type=_at_least(1), default=None)
    p.set_defaults(run=_corpus)

    p = add("train-tokenizer", help="train a T5-style SentencePiece model")
    p.add_argument("--input", nargs="+", required=True, help="jsonl files")
    p.add_argument("--output", required=True, help="model prefix (writes PREFIX.model)")
    p.add_argument("--vocab-size", type=_at_least(1), default=8000,
                   help="including the 100 sentinels")
    p.add_argument("--key", default="text", help="json key holding the text")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.set_defaults(run=_train_tokenizer)

    p = add("preprocess", help="tokenize jsonl into .bin/.idx datasets")
    p.add_argument("--input", nargs="+", required=True, help="jsonl / jsonl.gz files or globs")
    p.add_argument("--output", required=True, help="prefix: writes PREFIX_<key>_document.*")
    p.add_argument("--tokenizer", required=True, help="'bytes', a .model, or a tokenizer.json")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to store, e.g. 'text' or 'inputs targets' for prompted data")
    p.add_argument("--workers", type=_at_least(1), default=os.cpu_count() or 1)
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to each document")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines instead of stopping")
    p.add_argument("--dtype", default=None, choices=["uint16", "int32"],
                   help="token dtype (default: uint16 when the vocabulary fits)")
    p.set_defaults(run=_preprocess)

    p = add("merge", help="concatenate several .bin/.idx datasets into one")
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes")
    p.add_argument("--output", required=True)
    p.set_defaults(run=_merge)

    p = add(
        "inspect", help="show samples as the model receives them",
        description="Show samples. Data settings are --data.<field> overrides, e.g. "
        "--data.paths data/stdlib --data.tokenizer data/stdlib_sp.model --data.objective mlm",
    )
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("--start", type=_at_least(0), default=0, help="first sample index")
    p.add_argument("--count", type=_at_least(1), default=2, help="how many samples")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.set_defaults(run=_inspect, takes_overrides=True)

    p = add("p3", help="T0's MTF mixture and eval tasks from a P3 download (offline)",
            description="Read a bigscience/P3 download (TFRecord task folders) and write T0's "
            "training mixture as prompted jsonl per dataset (OUT/mtf) and T0's held-out tasks "
            "as megarch-eval task files (OUT/tasks), with OUT/summary.json and "
            "OUT/mtf_data.json (data.paths + data.mixture_cap 500000).")
    p.add_argument("--p3-dir", required=True, help="the P3 download (holding data/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mixture", default="t0_train", choices=["t0_train", "none"])
    p.add_argument("--eval", default="t0_eval", choices=["t0_eval", "none"])
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="validation")
    p.add_argument("--workers", type=_at_least(1), default=os.cpu_count() or 1)
    p.add_argument("--no-crc", action="store_true", help="skip TFRecord CRC checks (faster)")
    p.set_defaults(run=_p3)

    p = add("demo", help="corpus -> tokenizer -> dataset -> samples, end to end")
    p.add_argument("--dir", default="data", help="where to write (reused when present)")
    p.add_argument("--vocab-size", type=_at_least(1), default=8000)
    p.add_argument("--seq-len", type=_at_least(2), default=128)
    p.add_argument("--workers", type=_at_least(1), default=os.cpu_count() or 1)
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megarch-data``; returns the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "takes_overrides", False):
            args.run(args, rest)
        else:
            args.run(args)
    except (DataError, ConfigError) as err:
        print(f"megarch-data {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `megarch-data inspect | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
