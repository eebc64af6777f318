"""`loom eval ...`: model quality on a text: perplexity over windows (`ppl`), and mean NLL by position past
the trained context with and without RoPE scaling (`context`). The evaluations live in loom.eval."""

from __future__ import annotations

import argparse

from loom.cli.options import WEIGHTS, add_model_options, add_source_options, rope_scaling, use_threads
from loom.cli.output import print_json
from loom.cli.subcommands import Subcommand, register_subcommands


def _ppl_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--corpus", default="britannica", help="a named corpus (britannica, hamlet) or a text file")
    p.add_argument("--window", type=int, default=512, help="tokens per window, L (L - 1 scored per window)")
    p.add_argument("--max-tokens", type=int, default=None, help="keep the corpus's first N tokens (default: all)")
    p.add_argument("--protocol", default="gptq", choices=["gptq", "shifted"],
                   help="gptq: L-1 labels inside each window; shifted: labels run across window ends (n*L-1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")


def _ppl(args: argparse.Namespace) -> int:
    from loom.eval.perplexity import run_perplexity

    use_threads(args)
    result = run_perplexity(args.model, corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                            dtype=args.dtype, weights=args.weights, progress=not args.no_progress,
                            protocol=args.protocol, rope_scaling=rope_scaling(args))
    if args.json:
        print_json(result)
    else:
        r = result
        print(f"perplexity {r['perplexity']:.3f} ({r['protocol']}) on {r['tokens_scored']:,} scored tokens "
              f"({r['windows']} windows of {r['window']}, {r['tokens_total']:,} tokens in {r['corpus_path']}); "
              f"{r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tok/s")
    return 0


def _context_options(p: argparse.ArgumentParser) -> None:
    add_source_options(p)
    p.add_argument("--weights", default="fp32", choices=WEIGHTS)
    p.add_argument("--methods", default="none,linear,ntk,yarn",
                   help="comma-separated: none (plain RoPE), linear (PI), ntk, yarn")
    p.add_argument("--rope-factor", type=float, default=2.0, help="scaling factor s of every method but none")
    p.add_argument("--rope-original-context", type=int, default=None,
                   help="the trained context L0 the scaling starts from (default: the file's)")
    p.add_argument("--corpus", default="britannica", help="a named corpus (britannica, hamlet) or a text file")
    p.add_argument("--window", type=int, default=16384, help="tokens per window, scored from position 0")
    p.add_argument("--windows", type=int, default=2, help="non-overlapping windows from the corpus start")
    p.add_argument("--bucket", type=int, default=2048, help="positions per reported bucket")
    p.add_argument("--out", default=None, help="write the JSON here (rewritten after each method)")
    p.add_argument("--plot", default=None, help="write NLL per position bucket to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")


def _context(args: argparse.Namespace) -> int:
    from loom.eval.context import format_table, plot_context, run_context

    use_threads(args)
    methods = [m for m in args.methods.split(",") if m]
    result = run_context(args.model, methods=methods, factor=args.rope_factor,
                         original_context=args.rope_original_context, window=args.window, windows=args.windows,
                         bucket=args.bucket, corpus=args.corpus, weights=args.weights,
                         progress=not args.no_progress, out=args.out)
    if args.plot:
        plot_context(result, args.plot)
    if args.json:
        print_json(result)
    else:
        print(f"mean NLL (perplexity) by position, {result['windows']} windows of {result['window']} tokens "
              f"of {result['corpus']}, factor {result['factor']:g}, trained context {result['trained_context']}")
        print(format_table(result))
    return 0


EVALS = {
    "ppl": Subcommand("perplexity over non-overlapping windows (the GPTQ repository's protocol)", _ppl_options, _ppl),
    "context": Subcommand("NLL by position past the trained context, with and without RoPE scaling",
                          _context_options, _context),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    register_subcommands(subparsers.add_parser("eval", help="model quality on a text"), "eval", EVALS)


def run(args: argparse.Namespace) -> int | None:
    return EVALS[args.eval].run(args)
