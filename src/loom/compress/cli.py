"""`loom quantize` and `loom prune`: post-training compression of a model into a checkpoint loom loads
(natively, when quantized)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_quantize_parser(sub: Any, model_args: Any) -> None:
    q = sub.add_parser("quantize", help="post-training quantization (RTN, AWQ, GPTQ, SmoothQuant) to a checkpoint")
    model_args(q)
    q.add_argument("--method", default="rtn", choices=["rtn", "awq", "gptq", "smoothquant", "w8a8"])
    q.add_argument("--bits", type=int, default=4, help="bits per weight code (weight-only methods)")
    q.add_argument("--group-size", type=int, default=32, help="inputs per scale; 0 = one per output channel")
    q.add_argument("--symmetric", action="store_true", help="symmetric grid (default: asymmetric, with zero points)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in order")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H)")
    q.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    q.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
    _add_calibration_args(q)
    q.add_argument("--backend", default="auto", choices=["auto", "loom", "torch", "reference"],
                   help="kernel recorded in the checkpoint (auto: the fastest that runs the format)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)


def _add_calibration_args(p: Any) -> None:
    p.add_argument("--calib", default="hamlet", help="calibration text: a named corpus or a file (never the eval text)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)


def _load_fp32(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(path, the fp32 model, its tokenizer) of ``--model`` (default: the default model)."""
    import torch

    from loom.default_model import default_model_path
    from loom.tokenizer import load_tokenizer
    from loom.weights.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    loaded = load_model(path, weights="fp32")
    return path, loaded.model, load_tokenizer(path, loaded.metadata, loaded.config.eos_token_ids)


def _calibration(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Calibration samples [samples, seq_len] from ``--calib``, and how a checkpoint records them."""
    from loom.compress.calibration import CalibrationConfig, calibration_samples
    from loom.eval.corpora import corpus_path

    calib_file = corpus_path(args.calib)
    with open(calib_file, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    samples = calibration_samples(ids, CalibrationConfig(args.samples, args.seq_len, args.seed))
    return samples, {"text": calib_file, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed}


def cmd_quantize(args: argparse.Namespace) -> int:
    from loom.analysis.traffic import weight_bytes_per_token
    from loom.compress.quantize.awq import AWQConfig
    from loom.compress.quantize.gptq import GPTQConfig
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.compress.quantize.rtn import QuantConfig
    from loom.weights.quantized_checkpoint import save_checkpoint

    t0 = time.perf_counter()
    path, model, tokenizer = _load_fp32(args)
    dense_bytes = weight_bytes_per_token(model)
    recipe = QuantizeRecipe(method=args.method, quant=QuantConfig(args.bits, args.group_size, args.symmetric),
                            awq=AWQConfig(clip=not args.no_clip),
                            gptq=GPTQConfig(damp=args.damp, act_order=not args.no_act_order),
                            alpha=args.alpha, backend=args.backend)
    samples, calibration = _calibration(args, tokenizer) if args.method != "rtn" else (None, None)
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


def add_prune_parser(sub: Any, model_args: Any) -> None:
    p = sub.add_parser("prune", help="post-training pruning (magnitude, Wanda, SparseGPT), optionally quantized, "
                                     "to a checkpoint")
    model_args(p)
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="fraction of each linear's weights to zero, in [0, 1)")
    target.add_argument("--pattern", help="N:M: zero N of every M consecutive inputs (2:4, 4:8)")
    p.add_argument("--bits", type=int, default=None, help="also quantize (SparseGPT: jointly; others: RTN after)")
    p.add_argument("--group-size", type=int, default=64, help="inputs per scale when quantizing; 0 = per channel")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT: columns per mask selection and lazy batch")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean(diag H)")
    _add_calibration_args(p)
    p.add_argument("--backend", default="auto", choices=["auto", "loom", "torch", "reference"],
                   help="kernel recorded in a quantized checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from loom.compress.prune.masks import NMPattern
    from loom.compress.prune.methods import PruneRecipe, linear_sparsity, prune
    from loom.compress.prune.sparsegpt import SparseGPTConfig
    from loom.compress.quantize.rtn import QuantConfig
    from loom.weights.quantized_checkpoint import save_checkpoint

    target = NMPattern.parse(args.pattern) if args.pattern is not None else args.sparsity
    quant = None if args.bits is None else QuantConfig(args.bits, args.group_size)
    recipe = PruneRecipe(args.method, target, quant, SparseGPTConfig(args.block_size, args.damp), args.backend)
    t0 = time.perf_counter()
    path, model, tokenizer = _load_fp32(args)
    samples, calibration = _calibration(args, tokenizer) if args.method != "magnitude" else (None, None)
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
