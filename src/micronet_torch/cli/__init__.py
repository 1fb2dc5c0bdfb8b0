"""The command line: ``micronet`` and its subcommands, each a thin layer over a library function."""

from .common import CLIError
from .main import build_parser, main

__all__ = ["CLIError", "build_parser", "main"]
