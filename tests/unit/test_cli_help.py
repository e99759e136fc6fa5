"""`--help` of pretrain-launch, pretrain-ckpt and pretrain-sweep: every option and argument of
every subcommand is explained, each that takes a value with an example (`e.g.`), and each
command ends with example command lines."""

from __future__ import annotations

import argparse

import pytest

from launch.cli import parser as launch_parser
from pretrain.ckpt_cli import parser as ckpt_parser
from pretrain.scaling.cli import parser as sweep_parser

COMMANDS = {
    "pretrain-launch": launch_parser,
    "pretrain-ckpt": ckpt_parser,
    "pretrain-sweep": sweep_parser,
}


def commands(p: argparse.ArgumentParser, name: str):
    """(name, parser) of `p` and of each of its subcommands, depth first."""
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from commands(sub, f"{name} {sub_name}")


def unexplained(p: argparse.ArgumentParser) -> list[str]:
    """What `p`'s help leaves unexplained: an argument with no help, or a value with no example."""
    out = []
    for action in p._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            out.append(f"{name}: no help")
        elif action.nargs != 0 and "e.g." not in action.help:  # nargs 0: a flag, no value
            out.append(f"{name}: no example")
    if not any(a for a in p._actions if isinstance(a, argparse._SubParsersAction)):
        if "example" not in (p.epilog or ""):
            out.append("no example command lines")
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_explained_with_an_example(command):
    found = list(commands(COMMANDS[command](), command))
    assert len(found) >= 1
    problems = {name: unexplained(p) for name, p in found if unexplained(p)}
    assert problems == {}
    for name, p in found:  # what the user sees: the help renders, with its examples
        assert name.split()[0] in p.format_help()


def test_the_check_finds_what_is_missing():
    """Negative control: an option without an example, an argument without help and a
    command without example lines are each reported."""
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("path")
    p.add_argument("--out", help="where to write")
    p.add_argument("--json", action="store_true", help="JSON output")
    assert unexplained(p) == ["path: no help", "--out: no example", "no example command lines"]
    sub = argparse.ArgumentParser(prog="y").add_subparsers().add_parser("go", epilog="example: y")
    sub.add_argument("n", help="a count, e.g. 3")
    assert unexplained(sub) == []
