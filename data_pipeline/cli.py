"""The ``pretrain-data`` command: build, inspect and verify tokenized datasets.

    pretrain-data build --stdlib --out data/stdlib
    pretrain-data build --input corpus/ 'more/*.jsonl' --out data/mine --vocab-size 8192
    pretrain-data inspect data/stdlib
    pretrain-data verify data/stdlib

Bad input exits with status 2 and one line on stderr naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.build import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
    build,
    summarize,
)
from data_pipeline.errors import DataError
from data_pipeline.shards import SPLITS, check_complete, iter_shard, verify
from data_pipeline.sources import stdlib_sources
from data_pipeline.tokenizer import Tokenizer

EXIT_DATA_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        return args.run(args)
    except DataError as e:
        print(f"pretrain-data: error: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt:
        print("pretrain-data: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain-data", description="Build, inspect and verify tokenized datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build(commands)
    inspect = commands.add_parser("inspect", help="print a dataset's counts and a sample")
    inspect.add_argument("dataset", type=Path, metavar="DIR")
    inspect.add_argument("--split", choices=SPLITS, default="train", help="split to sample")
    inspect.add_argument(
        "--tokens", type=int, default=64, help="tokens of the first document to decode"
    )
    inspect.set_defaults(run=_run_inspect)
    check = commands.add_parser("verify", help="re-hash every shard against the manifest")
    check.add_argument("dataset", type=Path, metavar="DIR")
    check.set_defaults(run=_run_verify)
    return parser


def _add_build(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("build", help="tokenize sources into shards")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="files (.txt, .jsonl, .parquet; other suffixes read as text), directories, globs",
    )
    source.add_argument(
        "--stdlib", action="store_true", help="the running Python's standard library (demo)"
    )
    cmd.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset directory")
    cmd.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"BPE vocabulary to train (default {DEFAULT_VOCAB_SIZE})",
    )
    cmd.add_argument("--tokenizer", type=Path, help="load this tokenizer.json instead of training")
    cmd.add_argument("--text-field", default="text", help="JSONL key / parquet column of the text")
    cmd.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of documents for validation (default {DEFAULT_VAL_FRACTION})",
    )
    cmd.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"start a new shard after this many tokens (default {DEFAULT_SHARD_TOKENS})",
    )
    cmd.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(run=_run_build)


def _setup_logging() -> None:
    """Progress messages on stderr, so stdout carries only the results."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("data_pipeline")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _run_build(args: argparse.Namespace) -> int:
    inputs = stdlib_sources() if args.stdlib else args.input
    result = build(
        inputs,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    status = "already built, nothing to do" if result.reused else f"built in {result.seconds:.1f} s"
    print(f"{result.out}: {status}")
    print(f"  {summarize(result.info)}")
    print(f"  fingerprint {result.fingerprint}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    info, records = check_complete(args.dataset)
    tok_info = info["tokenizer"]
    print(f"dataset      {args.dataset}")
    print(f"fingerprint  {info['fingerprint']}")
    print(f"dtype        {info['dtype']}")
    print(
        f"tokenizer    {tok_info['file']}: vocab {tok_info['vocab_size']}, "
        f"eos_id {tok_info['eos_id']}, pad_id {tok_info['pad_id']}, sha256 {tok_info['sha256']}"
    )
    print(f"sources      {len(info['sources'])} files")
    print(f"settings     {info['settings']}")
    print(f"skipped      {info['skipped']}")
    print(f"{'split':<6} {'documents':>12} {'tokens':>14} {'shards':>7}")
    for split in SPLITS:
        entry = info["splits"][split]
        print(
            f"{split:<6} {entry['documents']:>12,} {entry['tokens']:>14,} {len(entry['shards']):>7}"
        )
    shards = [r for r in records if r.split == args.split]
    if shards:
        _print_sample(args.dataset, tok_info["file"], shards[0].shard, args.tokens)
    return 0


def _print_sample(root: Path, tokenizer_file: str, shard: str, count: int) -> None:
    """Decode the start of the first document of ``shard``."""
    tok = Tokenizer.load(root / tokenizer_file)
    key, ids = next(iter_shard(root / shard))
    shown = min(count, ids.size)
    print(f"\nfirst {shown} of {ids.size} tokens of document {key} in {shard}:")
    print(tok.decode(ids[:count].tolist()))


def _run_verify(args: argparse.Namespace) -> int:
    report = verify(args.dataset)
    print(
        f"{args.dataset}: OK, {report.shards} shards ({report.shard_bytes / 1e6:.1f} MB) "
        f"match the manifest; fingerprint {report.fingerprint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
