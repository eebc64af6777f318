"""Commands made of subcommands (`loom bench`, `loom eval`, `loom analyze`): each subcommand is a help
line, a function that adds its options and a function that runs it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def register_subcommands(parser: argparse.ArgumentParser, dest: str, table: dict[str, Subcommand]) -> None:
    """Add ``table``'s subcommands to ``parser``, in order; the chosen name lands in ``args.<dest>``."""
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, command in table.items():
        command.add_options(sub.add_parser(name, help=command.help))
