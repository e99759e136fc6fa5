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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain-ckpt", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="step, layout, tokens seen, last loss, config diff")
    i.add_argument("path")
    i.add_argument("--config", help="a config YAML to diff the checkpoint's config against")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    c = sub.add_parser("convert", help="one consolidated TP=1 safetensors file")
    c.add_argument("path")
    c.add_argument("out", help="OUT.safetensors")
    e = sub.add_parser("export", help="Hugging Face transformers format with the tokenizer")
    e.add_argument("path")
    e.add_argument("out", help="output directory")
    e.add_argument("--hf", action="store_true", required=True, help="transformers format")
    e.add_argument("--tokenizer", help="tokenizer.json (default: the run's dataset tokenizer)")
    return p.parse_args(argv)


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
