"""The ``pretrain-data`` command: build, import, inspect and verify tokenized datasets.

    pretrain-data build --stdlib --out data/stdlib
    pretrain-data build --input corpus/ 'more/*.jsonl' --out data/mine --vocab-size 8192
    pretrain-data build --input corpus/ --out data/bytes --tokenizer bytes
    pretrain-data import --megatron data/web_text_document --tokenizer tok.json --out data/web
    pretrain-data import --flat train.bin --dtype uint16 --eos-id 50256 --tokenizer tok.json \\
        --out data/owt
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
    BYTES_TOKENIZER,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_TOKENIZER_SAMPLE_MB,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
    BuildResult,
    build,
)
from data_pipeline.dataset import check_digest
from data_pipeline.digest import file_digest
from data_pipeline.errors import DataError
from data_pipeline.importers import FLAT_DTYPES, import_tokens
from data_pipeline.shards import SPLITS, ShardRecord, check_complete, iter_shard, verify
from data_pipeline.sources import stdlib_sources
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.writer import summarize

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
        prog="pretrain-data",
        description="Build, import, inspect and verify tokenized datasets.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],  # the module docstring's commands
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build(commands)
    _add_import(commands)
    inspect = commands.add_parser("inspect", help="print a dataset's counts and samples")
    inspect.add_argument("dataset", type=Path, metavar="DIR", help="dataset, e.g. data/stdlib")
    inspect.add_argument("--split", choices=SPLITS, default="train", help="split to sample")
    inspect.add_argument("--samples", type=int, default=3, help="documents to decode (default 3)")
    inspect.add_argument(
        "--tokens", type=int, default=64, help="tokens of each sample to decode (default 64)"
    )
    inspect.set_defaults(run=_run_inspect)
    check = commands.add_parser(
        "verify", help="re-hash every shard and check every token id against the vocabulary"
    )
    check.add_argument("dataset", type=Path, metavar="DIR", help="dataset, e.g. data/stdlib")
    check.set_defaults(run=_run_verify)
    return parser


def _add_build(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("build", help="tokenize text sources into shards")
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
    cmd.add_argument(
        "--tokenizer",
        metavar="FILE|bytes",
        help=f"load this tokenizer.json instead of training one, or '{BYTES_TOKENIZER}' for "
        f"the byte tokenizer (no training)",
    )
    cmd.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=DEFAULT_TOKENIZER_SAMPLE_MB,
        metavar="MB",
        help=f"text to train the tokenizer on, a deterministic sample of the inputs "
        f"(default {DEFAULT_TOKENIZER_SAMPLE_MB})",
    )
    cmd.add_argument("--text-field", default="text", help="JSONL key / parquet column of the text")
    cmd.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that tokenize (default: all cores); the output does not depend on it",
    )
    _add_split_options(cmd)
    cmd.set_defaults(run=_run_build)


def _add_import(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("import", help="import already-tokenized data into shards")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--megatron",
        nargs="+",
        action="extend",
        metavar="PREFIX",
        help="Megatron-LM indexed datasets: PREFIX.bin + PREFIX.idx (globs allowed)",
    )
    source.add_argument(
        "--flat",
        nargs="+",
        action="extend",
        metavar="FILE",
        help="bare little-endian token files, documents separated by --eos-id (globs allowed)",
    )
    cmd.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset directory")
    cmd.add_argument(
        "--tokenizer",
        required=True,
        metavar="FILE|bytes",
        help="the tokenizer.json the ids come from (vocabulary size and special ids)",
    )
    cmd.add_argument("--dtype", choices=FLAT_DTYPES, help="id type of --flat files")
    cmd.add_argument(
        "--eos-id",
        type=int,
        default=None,
        help="--flat: the id between documents (required); --megatron: the trailing id "
        "removed from each document (default: the tokenizer's <|endoftext|>)",
    )
    _add_split_options(cmd)
    cmd.set_defaults(run=_run_import)


def _add_split_options(cmd: argparse.ArgumentParser) -> None:
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
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        workers=args.workers,
        progress=not args.no_progress,
    )
    _print_result(result, "built")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    result = import_tokens(
        args.out,
        tokenizer=args.tokenizer,
        megatron=args.megatron or (),
        flat=args.flat or (),
        dtype=args.dtype,
        eos_id=args.eos_id,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    _print_result(result, "imported")
    return 0


def _print_result(result: BuildResult, verb: str) -> None:
    status = (
        "already there, nothing to do" if result.reused else f"{verb} in {result.seconds:.1f} s"
    )
    print(f"{result.out}: {status}")
    print(f"  {summarize(result.info)}")
    print(f"  fingerprint {result.fingerprint}")


def _run_inspect(args: argparse.Namespace) -> int:
    info, records = check_complete(args.dataset)
    # What is shown is checked: every shard's size (a stat each), and the sha256 of each shard
    # a sample is decoded from; `verify` hashes and reads them all.
    for record in records:
        size = (args.dataset / record.shard).stat().st_size
        check_digest(args.dataset / record.shard, size, record.sha256, record.bytes, None)
    tok_info = info["tokenizer"]
    print(f"dataset      {args.dataset}")
    print(f"fingerprint  {info['fingerprint']}")
    print(f"dtype        {info['dtype']}")
    print(
        f"tokenizer    {tok_info['file']}: vocab {tok_info['vocab_size']}, "
        f"sha256 {tok_info['sha256']}"
    )
    print(
        f"special ids  eos {tok_info['eos_id']}, pad {tok_info['pad_id']}, "
        f"mask {tok_info['mask_id']}, sentinels {_id_range(tok_info['sentinel_ids'])}"
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
    print(f"checked      the size of all {len(records)} shards (pretrain-data verify: contents)")
    shards = [r for r in records if r.split == args.split]
    if shards and args.samples > 0:
        tok = Tokenizer.load(args.dataset / tok_info["file"])
        _print_samples(args.dataset, tok, shards, args.samples, args.tokens)
    return 0


def _id_range(ids: list[int]) -> str:
    """Sentinel ids compactly: "3..102 (100)" when consecutive, "none" when absent."""
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}..{ids[-1]} ({len(ids)})"
    return str(ids)


def _print_samples(
    root: Path, tok: Tokenizer, shards: list[ShardRecord], samples: int, count: int
) -> None:
    """Decode the start of the split's first ``samples`` documents, from shards whose sha256
    is the manifest's."""
    shown = 0
    for record in shards:
        shard = record.shard
        size, digest = file_digest(root / shard)
        check_digest(root / shard, size, digest, record.bytes, record.sha256)
        for key, ids in iter_shard(root / shard):
            print(
                f"\n--- document {key} of {shard}: "
                f"first {min(count, ids.size)} of {ids.size} tokens"
            )
            print(tok.decode(ids[:count].tolist()))
            shown += 1
            if shown == samples:
                return


def _run_verify(args: argparse.Namespace) -> int:
    report = verify(args.dataset)
    print(
        f"{args.dataset}: OK, {report.shards} shards ({report.shard_bytes / 1e6:.1f} MB) match "
        f"the manifest; {report.documents:,} documents, {report.tokens:,} tokens, every id "
        f"below the vocabulary size {report.vocab_size}; fingerprint {report.fingerprint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
