"""`loom chat`: an interactive conversation in the terminal, each answer streamed; /reset clears the
conversation, /exit or Ctrl-D leaves."""

from __future__ import annotations

import argparse
import sys

from loom.cli.options import (add_device_option, add_engine_options, add_model_options, add_sampling_options,
                              add_speculative_options, llm_from_args, sampling_params)
from loom.cli.output import stats_line


def register(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser("chat", help="interactive chat, streaming")
    add_model_options(c)
    add_device_option(c)
    add_engine_options(c)
    add_speculative_options(c)
    add_sampling_options(c, max_tokens=512)
    c.add_argument("--system", default=None)


def run(args: argparse.Namespace) -> int:
    from loom.outputs import Timings

    llm = llm_from_args(args)
    print(llm.engine.describe(), file=sys.stderr)
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"loom chat: {llm.config.name or llm.model_path} (load {llm.load_seconds:.2f} s). "
          "/reset clears the conversation, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        timings, answer = Timings(), []
        try:
            for delta in llm.chat_stream(system + history, params, timings):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                answer.append(delta.text)
        except KeyboardInterrupt:
            pass  # stop this answer, keep the conversation
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        print(stats_line(timings), file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(answer)})
