"""The ``micronet`` command: the parser, one subcommand module each, and the one place errors become messages.

Each subcommand module (``models``, ``train``, ``eval``, ...) adds its parser with ``register_cli(subparsers)``
and calls a library function that also works without the command line. The modules import torch and the rest
of the library only inside the functions that run a command, so that building the parser is quick:
``micronet --help`` loads no torch, and ``micronet COMMAND ...`` builds only that command's parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from .._env import __version__
from .._text import MESSAGE_LIMIT, one_line
from .common import user_errors

# subcommand modules, in the order ``micronet --help`` lists them, and the commands each one registers
COMMANDS: dict[str, tuple[str, ...]] = {
    "models": ("models", "profile", "convert"),
    "train": ("train",),
    "status": ("status",),
    "eval": ("eval",),
    "predict": ("predict",),
    "demo": ("demo",),
    "export": ("export",),
    "bench": ("bench",),
    "bench_train": ("bench-train",),
    "experiment": ("experiment",),
}


def _modules(command: str | None) -> list[ModuleType]:
    """The module that registers ``command``, or all of them (``None`` or a name no module registers)."""
    names = [m for m, commands in COMMANDS.items() if command in commands] or list(COMMANDS)
    return [importlib.import_module(f".{name}", __package__) for name in names]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``micronet`` parser: every subcommand, or only ``command``'s (what ``main`` needs to run it)."""
    parser = argparse.ArgumentParser(prog="micronet", description="MicroNet models: create, train, evaluate, deploy")
    parser.add_argument("--version", action="version", version=f"micronet-torch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _modules(command):
        module.register_cli(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except user_errors() as err:
        print(f"micronet {args.command}: error: {one_line(err, MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"micronet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
