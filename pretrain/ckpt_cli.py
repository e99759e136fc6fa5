"""`pretrain-ckpt`: look into, consolidate and export checkpoints (any layout: ZeRO 0-3,
tensor-parallel shards, pipeline stages; read through pretrain.generate_cli.load_model).

  pretrain-ckpt inspect PATH [--config CFG] [--json]   step, layout, tokens seen, last loss,
                                                       and the config keys CFG changes
  pretrain-ckpt convert PATH OUT.safetensors           one TP=1 float32 state dict
  pretrain-ckpt export PATH OUT_DIR --hf               transformers model + tokenizer

PATH is a run directory, its checkpoints/ directory (the newest complete checkpoint), or one
step_* directory. Exit status 2 with one `error:` line for a bad path or an option the export
target has no equivalent for.
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.errors import run_cli

PATH_HELP = (
    "a run directory, its checkpoints/ directory (the newest complete checkpoint) or one step_* "
    "directory, e.g. runs/tiny or runs/tiny/checkpoints/step_00000020"
)
EXAMPLES = {
    "inspect": "examples:\n"
    "  pretrain-ckpt inspect runs/tiny\n"
    "  pretrain-ckpt inspect runs/tiny/checkpoints/step_00000020 --config configs/tiny.yaml\n"
    "  pretrain-ckpt inspect runs/tiny --json",
    "convert": "example:\n  pretrain-ckpt convert runs/tiny exports/tiny.safetensors",
    "export": "examples:\n"
    "  pretrain-ckpt export runs/tiny exports/tiny-hf --hf\n"
    "  pretrain-ckpt export runs/tiny exports/tiny-hf --hf --tokenizer data/stdlib/tokenizer.json",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-ckpt",
        description=__doc__,
        epilog="examples:\n"
        + "\n".join(line for text in EXAMPLES.values() for line in text.splitlines()[1:2]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    i = command("inspect", "step, layout, tokens seen, last loss, and the config keys CFG changes")
    i.add_argument("path", metavar="PATH", help=PATH_HELP)
    i.add_argument(
        "--config",
        metavar="CFG",
        help="a config YAML: list the keys whose values differ from the checkpoint's config, "
        "e.g. --config configs/tiny.yaml",
    )
    i.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of text, e.g. for jq: --json | jq .step",
    )
    c = command("convert", "one consolidated tensor-parallel-1 float32 safetensors file")
    c.add_argument("path", metavar="PATH", help=PATH_HELP)
    c.add_argument(
        "out",
        metavar="OUT.safetensors",
        help="the file to write (its folder is created; the config goes into its metadata), "
        "e.g. exports/tiny.safetensors",
    )
    e = command("export", "a Hugging Face transformers model directory with the tokenizer")
    e.add_argument("path", metavar="PATH", help=PATH_HELP)
    e.add_argument(
        "out",
        metavar="OUT_DIR",
        help="the directory to write (config.json, model.safetensors, tokenizer files), "
        "e.g. exports/tiny-hf",
    )
    e.add_argument(
        "--hf",
        action="store_true",
        required=True,
        help="the transformers format (the only one; required so the target is explicit), "
        "e.g. export runs/tiny out --hf",
    )
    e.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="tokenizer.json to ship (default: the run's dataset tokenizer), "
        "e.g. --tokenizer data/stdlib/tokenizer.json",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def run(args: argparse.Namespace) -> str:
    from pretrain import export

    if args.command == "inspect":
        info = export.inspect(args.path, args.config)
        return json.dumps(info, indent=2, default=str) if args.json else export.format_inspect(info)
    if args.command == "convert":
        return f"wrote {export.convert(args.path, args.out)}"
    out = export.export_hf(args.path, args.out, args.tokenizer)
    return f"wrote {out} (transformers; load with from_pretrained({str(out)!r}))"


def main(argv: list[str] | None = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
