"""The ``micronet`` command: the parser, one subcommand module each, and the one place errors become messages.

Each subcommand module (``models``, ``train``, ``eval``, ...) adds its parser with ``register_cli(subparsers)``
and calls a library function that also works without the command line.
"""

from __future__ import annotations

import argparse
import sys

from .._env import __version__
from .._text import MESSAGE_LIMIT, one_line
from . import bench, bench_train, demo, experiment, export, models, predict, status, train
from . import eval as eval_
from .common import USER_ERRORS

# subcommand modules, in the order ``micronet --help`` lists them
COMMANDS = (models, train, status, eval_, predict, demo, export, bench, bench_train, experiment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="micronet", description="MicroNet models: create, train, evaluate, deploy")
    parser.add_argument("--version", action="version", version=f"micronet-torch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except USER_ERRORS as err:
        print(f"micronet {args.command}: error: {one_line(err, MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"micronet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
