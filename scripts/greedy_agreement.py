"""Greedy agreement of a reduced-precision path with fp32, and its run-to-run determinism.

    python scripts/greedy_agreement.py [--weights bf16] [--prompts 32] [--tokens 64] [--alone]

Runs the same chat prompts (greedy, exactly --tokens tokens each, all in one batch) through loom with
fp32 weights, then twice with --weights, and prints JSON: the share of prompts whose continuations are
identical to fp32's, the mean length of the common prefix, and whether the two reduced-precision runs
(same batch composition) gave the same tokens (docs/RESULTS.md, issue 16). ``--alone`` also runs each
prompt by itself with --weights and gives the share of prompts whose batched tokens equal their tokens
alone (batch invariance; ``--weights fp32 --alone`` checks fp32's).
"""

from __future__ import annotations

import argparse
import json

from loom import LLM, SamplingParams

TOPICS = ["the sea", "a clock", "winter", "bread", "a library", "rain", "mountains", "a violin", "the moon",
          "trains", "gardens", "a lighthouse", "paper", "bees", "salt", "a bridge"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    kinds = ["Write two sentences about {}.", "Explain what {} is to a child."]
    return [[{"role": "user", "content": kinds[i // len(TOPICS) % 2].format(TOPICS[i % len(TOPICS)])}]
            for i in range(n)]


def tokens(llm: LLM, chats: list, n: int) -> list[list[int]]:
    llm.engine.block_manager.reset_prefix_cache()  # the same work every run: no prompt found cached
    ids = [llm.encode_chat(c) for c in chats]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, min_tokens=n))
    return [o.token_ids for o in outs]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="bf16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--alone", action="store_true")
    args = ap.parse_args()
    chats = prompts(args.prompts)
    want = tokens(LLM(weights="fp32"), chats, args.tokens)
    llm = LLM(weights=args.weights)
    first, second = tokens(llm, chats, args.tokens), tokens(llm, chats, args.tokens)
    prefixes = [common_prefix(a, b) for a, b in zip(want, first)]
    print(json.dumps({"weights": args.weights, "prompts": args.prompts, "tokens": args.tokens,
                      "identical_to_fp32": sum(a == b for a, b in zip(want, first)) / args.prompts,
                      "mean_common_prefix_with_fp32": sum(prefixes) / len(prefixes),
                      "token_agreement_before_first_divergence": sum(prefixes) / (args.prompts * args.tokens),
                      "run_to_run_identical": first == second,
                      **(batch_invariance(llm, chats, first, args.tokens) if args.alone else {}),
                      "decode_steps": llm.engine.runner.describe_steps()}, indent=2))


def batch_invariance(llm: LLM, chats: list, batched: list[list[int]], n: int) -> dict[str, float]:
    alone = [tokens(llm, [chat], n)[0] for chat in chats]
    return {"batched_equals_alone": sum(a == b for a, b in zip(batched, alone)) / len(chats)}


if __name__ == "__main__":
    main()
