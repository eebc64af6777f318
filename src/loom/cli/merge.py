"""`loom merge`: a LoRA adapter (PEFT's format) merged into its base model, written as a dense Hugging Face
folder (weights/merge.py)."""

from __future__ import annotations

import argparse
import json
import time

from loom.cli.options import add_source_options, use_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model (a dense HF folder)")
    add_source_options(p)
    p.add_argument("--lora", required=True, metavar="DIR", help="the PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from loom.default_model import default_model_path
    from loom.weights.merge import merge_lora

    use_threads(args)
    t0 = time.perf_counter()
    model = args.model or default_model_path()
    merge_lora(model, args.lora, args.out)
    result = {"out": args.out, "source": model, "lora": args.lora, "seconds": time.perf_counter() - t0}
    print(json.dumps(result, indent=2) if args.json else f"wrote {args.out}: {model} + {args.lora}, "
                                                         f"{result['seconds']:.1f} s")
    return 0
