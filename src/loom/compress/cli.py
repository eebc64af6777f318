"""`loom quantize`: post-training quantization of a model into a checkpoint loom loads natively."""

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
    q.add_argument("--calib", default="hamlet", help="calibration text: a named corpus or a file (never the eval text)")
    q.add_argument("--samples", type=int, default=32, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--backend", default="auto", choices=["auto", "loom", "torch", "reference"],
                   help="kernel recorded in the checkpoint (auto: the fastest that runs the format)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from loom.analysis.traffic import weight_bytes_per_token
    from loom.compress.calibration import CalibrationConfig, calibration_samples
    from loom.compress.quantize.awq import AWQConfig
    from loom.compress.quantize.gptq import GPTQConfig
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.compress.quantize.rtn import QuantConfig
    from loom.default_model import default_model_path
    from loom.eval.corpora import corpus_path
    from loom.tokenizer import load_tokenizer
    from loom.weights.loader import load_model
    from loom.weights.quantized_checkpoint import save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = args.model or default_model_path()
    loaded = load_model(path, weights="fp32")
    model = loaded.model
    tokenizer = load_tokenizer(path, loaded.metadata, loaded.config.eos_token_ids)
    dense_bytes = weight_bytes_per_token(model)
    recipe = QuantizeRecipe(method=args.method, quant=QuantConfig(args.bits, args.group_size, args.symmetric),
                            awq=AWQConfig(clip=not args.no_clip),
                            gptq=GPTQConfig(damp=args.damp, act_order=not args.no_act_order),
                            alpha=args.alpha, backend=args.backend)
    samples = None
    calib_file = None
    if args.method != "rtn":
        calib_file = corpus_path(args.calib)
        with open(calib_file, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        samples = calibration_samples(ids, CalibrationConfig(args.samples, args.seq_len, args.seed))
    quantize(model, recipe, samples)
    meta = recipe.metadata()
    if samples is not None:
        meta["calibration"] = {"text": calib_file, "samples": args.samples, "seq_len": args.seq_len,
                               "seed": args.seed}
    save_checkpoint(model, args.out, meta, tokenizer)
    result = {"out": args.out, "source": path, **meta, "seconds": time.perf_counter() - t0,
              "weight_bytes_dense_fp32": dense_bytes, "weight_bytes": weight_bytes_per_token(model)}
    print(json.dumps(result, indent=2) if args.json else
          f"wrote {args.out}: {args.method} {meta.get('bits')}-bit, decode reads "
          f"{result['weight_bytes'] / 1e6:.1f} MB per token (fp32: {dense_bytes / 1e6:.1f} MB), "
          f"{result['seconds']:.1f} s")
    return 0
