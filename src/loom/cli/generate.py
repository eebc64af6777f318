"""`loom generate`: complete one prompt (optionally in the model's chat template), streaming the text to
stdout and the speed to stderr, or printing one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import sys

from loom.cli.options import (add_device_option, add_engine_options, add_model_options, add_sampling_options,
                              add_speculative_options, llm_from_args, sampling_params)
from loom.cli.output import stats_line


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser("generate", help="complete one prompt, streaming the text")
    g.add_argument("prompt")
    add_model_options(g)
    add_device_option(g)
    add_engine_options(g)
    add_speculative_options(g)
    add_sampling_options(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def run(args: argparse.Namespace) -> int:
    from loom.outputs import Timings

    llm = llm_from_args(args)
    if not args.json:
        print(llm.engine.describe(), file=sys.stderr)
    params = sampling_params(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = llm.encode_chat(messages)
    else:
        prompt_ids = llm.encode(args.prompt)
    timings = Timings()
    text, tokens, finish, reason = [], [], None, None
    for delta in llm.stream(prompt_ids, params, timings):
        if not args.json:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        text.append(delta.text)
        tokens.extend(delta.token_ids)
        finish, reason = delta.finish_reason, delta.stop_reason
    if args.json:
        print(json.dumps({"prompt": args.prompt, "prompt_token_ids": prompt_ids, "token_ids": tokens,
                          "text": "".join(text), "finish_reason": finish, "stop_reason": reason,
                          "timings": {**timings.to_dict(), "load_s": llm.load_seconds}}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(stats_line(timings, llm.load_seconds), file=sys.stderr)
    return 0
