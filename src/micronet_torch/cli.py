"""The ``micronet`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in the module that implements it, as a ``register_cli(subparsers)`` function
that adds its parser and sets ``func``; modules are imported only to build the parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order ``micronet --help`` lists them
COMMAND_MODULES = (
    "micronet_torch.commands",  # models, profile, convert
    "micronet_torch.train",  # train
    "micronet_torch.evaluate",  # eval
    "micronet_torch.predict",  # predict
    "micronet_torch.demo",  # demo (the README's main job)
    "micronet_torch.deploy",  # export
    "micronet_torch.bench",  # bench
    "micronet_torch.experiment",  # experiment run / report
)


class CLIError(Exception):
    """A user error: printed as one clear message, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="micronet", description="MicroNet models: create, train, evaluate, deploy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue  # that subcommand is not built yet
            raise
        if hasattr(module, "register_cli"):
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
    except (CLIError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as err:
        print(f"micronet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"micronet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
