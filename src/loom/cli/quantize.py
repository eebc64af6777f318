"""`loom quantize`: post-training quantization of a model (RTN, AWQ, GPTQ, SmoothQuant, W8A8) into a
checkpoint folder that loom loads and runs natively. The methods live in loom.compress.quantize."""

from __future__ import annotations

import argparse
import json
import time

from loom.cli.options import add_calibration_options, add_source_options, calibration_from_args, fp32_model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser("quantize",
                              help="post-training quantization (RTN, AWQ, GPTQ, SmoothQuant) to a checkpoint")
    add_source_options(q)
    q.add_argument("--method", default="rtn", choices=["rtn", "awq", "gptq", "smoothquant", "w8a8"])
    q.add_argument("--bits", type=int, default=4, help="bits per weight code (weight-only methods)")
    q.add_argument("--group-size", type=int, default=32, help="inputs per scale; 0 = one per output channel")
    q.add_argument("--symmetric", action="store_true", help="symmetric grid (default: asymmetric, with zero points)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in order")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H)")
    q.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    q.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
    add_calibration_options(q)
    q.add_argument("--backend", default="auto", choices=["auto", "loom", "torch", "reference"],
                   help="kernel recorded in the checkpoint (auto: the fastest that runs the format)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from loom.analysis.traffic import weight_bytes_per_token
    from loom.compress.quantize.awq import AWQConfig
    from loom.compress.quantize.gptq import GPTQConfig
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.compress.quantize.rtn import QuantConfig
    from loom.weights.quantized_checkpoint import save_checkpoint

    t0 = time.perf_counter()
    path, model, tokenizer = fp32_model_from_args(args)
    dense_bytes = weight_bytes_per_token(model)
    recipe = QuantizeRecipe(method=args.method, quant=QuantConfig(args.bits, args.group_size, args.symmetric),
                            awq=AWQConfig(clip=not args.no_clip),
                            gptq=GPTQConfig(damp=args.damp, act_order=not args.no_act_order),
                            alpha=args.alpha, backend=args.backend)
    samples, calibration = calibration_from_args(args, tokenizer) if args.method != "rtn" else (None, None)
    quantize(model, recipe, samples)
    meta = recipe.metadata()
    if calibration is not None:
        meta["calibration"] = calibration
    save_checkpoint(model, args.out, meta, tokenizer)
    result = {"out": args.out, "source": path, **meta, "seconds": time.perf_counter() - t0,
              "weight_bytes_dense_fp32": dense_bytes, "weight_bytes": weight_bytes_per_token(model)}
    print(json.dumps(result, indent=2) if args.json else
          f"wrote {args.out}: {args.method} {meta.get('bits')}-bit, decode reads "
          f"{result['weight_bytes'] / 1e6:.1f} MB per token (fp32: {dense_bytes / 1e6:.1f} MB), "
          f"{result['seconds']:.1f} s")
    return 0
