"""The `loom` command: `main` parses the command line and runs one command.

Each command is a module of this package with ``register(subparsers)``, which adds its parser, and
``run(args)``, which runs it: generate, chat and serve run a model; embed embeds texts and rag
retrieves from an index of them; info describes a model; bench and eval measure, analyze calculates
(each with subcommands); quantize, prune and compress write compressed checkpoints, finetune trains a LoRA adapter,
distill trains a compressed student against its teacher and merge merges an adapter. The option groups
several commands share, and the one mapping from options to the LLM, are in ``loom.cli.options``.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Sequence

from loom.cli import (analyze, bench, chat, compress, distill, embed, finetune, generate, info, merge, prune,
                      quantize, rag, serve)
from loom.cli import eval as eval_command
from loom.errors import EngineUnavailableError, NotFoundError, QueueFullError

# `loom --help` lists the commands in this order
COMMANDS: dict[str, ModuleType] = {"generate": generate, "chat": chat, "serve": serve, "embed": embed, "rag": rag,
                                   "info": info, "bench": bench, "eval": eval_command, "analyze": analyze,
                                   "quantize": quantize, "prune": prune, "compress": compress, "finetune": finetune,
                                   "distill": distill, "merge": merge}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="A hackable LLM inference engine and efficiency lab.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.register(subparsers)
    return parser


# What a user's input can make loom raise: a bad option or request, a malformed or unreadable model file
# (WeightsError is a ValueError and names the file), an engine that cannot take the work. Anything else
# is a bug in loom and keeps its traceback.
USER_ERRORS = (ValueError, OSError, NotFoundError, QueueFullError, EngineUnavailableError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `loom ARGV` (default: the process's arguments); the exit status, 2 for a usage error, a bad
    model file or an unreadable one, reported on one line of stderr as `loom: error: ...`."""
    args = build_parser().parse_args(argv)
    try:
        if isinstance(getattr(args, "model", None), str):  # a model's name (e.g. gemma-3-270m) -> its path
            from loom.default_model import MODEL_NAMES, resolve_model

            if args.model.lower() in MODEL_NAMES:
                args.model = resolve_model(args.model)
        return COMMANDS[args.command].run(args) or 0
    except USER_ERRORS as e:
        print("loom: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
