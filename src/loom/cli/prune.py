"""`loom prune`: post-training pruning of a model (magnitude, Wanda, SparseGPT; unstructured or N:M),
optionally quantized too, into a checkpoint folder that loom loads. The methods live in
loom.compress.prune."""

from __future__ import annotations

import argparse
import json
import time

from loom.cli.options import add_calibration_options, add_source_options, calibration_from_args, fp32_model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prune", help="post-training pruning (magnitude, Wanda, SparseGPT), optionally "
                                            "quantized, to a checkpoint")
    add_source_options(p)
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="fraction of each linear's weights to zero, in [0, 1)")
    target.add_argument("--pattern", help="N:M: zero N of every M consecutive inputs (2:4, 4:8)")
    p.add_argument("--bits", type=int, default=None, help="also quantize (SparseGPT: jointly; others: RTN after)")
    p.add_argument("--group-size", type=int, default=64, help="inputs per scale when quantizing; 0 = per channel")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT: columns per mask selection and lazy batch")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean(diag H)")
    add_calibration_options(p)
    p.add_argument("--backend", default="auto", choices=["auto", "loom", "torch", "reference"],
                   help="kernel recorded in a quantized checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from loom.compress.prune.masks import NMPattern
    from loom.compress.prune.methods import PruneRecipe, linear_sparsity, prune
    from loom.compress.prune.sparsegpt import SparseGPTConfig
    from loom.compress.quantize.rtn import QuantConfig
    from loom.weights.quantized_checkpoint import save_checkpoint

    target = NMPattern.parse(args.pattern) if args.pattern is not None else args.sparsity
    quant = None if args.bits is None else QuantConfig(args.bits, args.group_size)
    recipe = PruneRecipe(args.method, target, quant, SparseGPTConfig(args.block_size, args.damp), args.backend)
    t0 = time.perf_counter()
    path, model, tokenizer = fp32_model_from_args(args)
    samples, calibration = calibration_from_args(args, tokenizer) if args.method != "magnitude" else (None, None)
    prune(model, recipe, samples)
    meta = recipe.metadata()
    if calibration is not None:
        meta["calibration"] = calibration
    save_checkpoint(model, args.out, recipe.quantization_metadata(), tokenizer, pruning=meta)
    result = {"out": args.out, "source": path, **meta, "quantization": recipe.quantization_metadata(),
              "linear_sparsity": linear_sparsity(model), "seconds": time.perf_counter() - t0}
    quantized = f", {args.bits}-bit g{args.group_size}" if quant is not None else ""
    print(json.dumps(result, indent=2) if args.json else
          f"wrote {args.out}: {args.method} {args.pattern or args.sparsity}{quantized}, "
          f"{100 * result['linear_sparsity']:.1f}% of the decoder linears' weights are zero, {result['seconds']:.1f} s")
    return 0
