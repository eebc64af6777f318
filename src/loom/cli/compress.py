"""`loom compress ...`: structural compressions that write a checkpoint folder loom loads, one subcommand each
(today `lowrank`: the decoder linears replaced by truncated-SVD factors, plain or activation-aware). The
methods live in loom.compress; quantize and prune are commands of their own."""

from __future__ import annotations

import argparse
import json
import time

from loom.cli.options import add_calibration_options, add_source_options, calibration_from_args, fp32_model_from_args
from loom.cli.subcommands import Subcommand, register_subcommands


def _lowrank_options(p: argparse.ArgumentParser) -> None:
    add_source_options(p)
    p.add_argument("--keep", type=float, default=0.75,
                   help="fraction of each factorized projection's parameters kept, in (0, 1]: rank r is the largest "
                        "with r (out + in) <= keep out in")
    p.add_argument("--method", default="svd", choices=["svd", "asvd"],
                   help="svd: truncated SVD of W; asvd: of W diag(s), s from calibration activations (ASVD)")
    p.add_argument("--alpha", type=float, default=0.5, help="asvd: s_j = mean|x_j| ^ alpha")
    p.add_argument("--targets", default=None,
                   help="comma-separated HF projections to factorize (default: all of q,k,v,o,gate,up,down_proj)")
    p.add_argument("--rank", type=int, default=None, help="one fixed rank for every target instead of --keep")
    p.add_argument("--output-error", action="store_true",
                   help="also report each projection's relative output error on the calibration text (svd then "
                        "reads calibration text too)")
    add_calibration_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")


def _lowrank(args: argparse.Namespace) -> int:
    from loom.compress.lowrank import PROJECTIONS, LowRankConfig, factorize
    from loom.weights.quantized_checkpoint import save_checkpoint

    targets = tuple(t for t in args.targets.split(",") if t) if args.targets else PROJECTIONS
    config = LowRankConfig(args.keep, args.method, args.alpha, targets, args.rank, args.output_error)
    t0 = time.perf_counter()
    path, model, tokenizer = fp32_model_from_args(args)
    samples, calibration = None, None
    if args.method == "asvd" or args.output_error:
        samples, calibration = calibration_from_args(args, tokenizer)
    report = factorize(model, config, samples)
    meta = {**config.metadata(), "decoder_linear_params_kept": report.fraction_kept}
    if calibration is not None:
        meta["calibration"] = calibration
    save_checkpoint(model, args.out, tokenizer=tokenizer, lowrank=meta)
    result = {"out": args.out, "source": path, **report.to_dict(), "seconds": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    low, high = report.rank_range
    errors = [r.weight_error for r in report.layers]
    print(f"wrote {args.out}: {args.method} keep {args.keep}, {len(report.layers)} projections at ranks {low}..{high}, "
          f"{100 * report.fraction_kept:.1f}% of the decoder linears' parameters kept, relative weight error "
          f"{min(errors):.3f}..{max(errors):.3f}, {result['seconds']:.1f} s")
    return 0


COMPRESSIONS = {
    "lowrank": Subcommand("factorize the decoder linears into low-rank pairs (truncated SVD or ASVD) to a "
                          "checkpoint", _lowrank_options, _lowrank),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    register_subcommands(subparsers.add_parser("compress", help="structural compression (low-rank factorization) "
                                                                "to a checkpoint"), "compression", COMPRESSIONS)


def run(args: argparse.Namespace) -> int | None:
    return COMPRESSIONS[args.compression].run(args)
