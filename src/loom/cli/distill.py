"""`loom distill`: train a student (pruned, low-rank, quantized or dense) on a teacher's softened
distributions mixed with the data's cross-entropy (loom.finetune.distill), in full or through LoRA."""

from __future__ import annotations

import argparse
import json

from loom.cli.finetune import add_training_options, train_config_from_args
from loom.cli.options import use_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("distill", help="knowledge distillation: a student learns a teacher's distributions")
    p.add_argument("--teacher", default=None, help="the teacher (default: SmolLM2-135M-Instruct)")
    p.add_argument("--student", required=True, help="the student: a folder loom loads (e.g. from loom prune, "
                                                    "loom compress lowrank, loom quantize)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--data", required=True, help="a text file (packed into windows), a .jsonl of {\"messages\"} "
                                                 "or a named corpus (britannica, hamlet)")
    p.add_argument("--skip-tokens", type=int, default=0,
                   help="train on a text only after its first N tokens (e.g. the span --eval-corpus scores)")
    p.add_argument("--eval-data", default=None, help="a held-out file (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-corpus", default=None,
                   help="also score perplexity on this corpus (britannica, hamlet or a file; windows of 512, "
                        "first 20,480 tokens, as loom bench pruning)")
    p.add_argument("--out", required=True, help="the folder to write (the trained student, or its adapter)")
    d = p.add_argument_group("distillation")
    d.add_argument("--temperature", type=float, default=2.0, help="T: both distributions softened by 1/T")
    d.add_argument("--alpha", type=float, default=0.9,
                   help="weight of the teacher's term (T^2 KL); 1 - alpha on the data's cross-entropy")
    d.add_argument("--lora-r", type=int, default=None,
                   help="train a LoRA adapter of this rank on the frozen student (required for a quantized one); "
                        "default: every decoder-layer parameter trains")
    d.add_argument("--lora-alpha", type=float, default=None, help="default 2 r")
    add_training_options(p)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from loom.default_model import default_model_path
    from loom.finetune.distill import DistillConfig
    from loom.finetune.distill_run import DistillRunConfig, run_distill
    from loom.finetune.lora import LoraConfig

    use_threads(args)
    lora = None if args.lora_r is None else LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r, seed=args.seed)
    config = DistillRunConfig(
        teacher=args.teacher or default_model_path(), student=args.student, data=args.data, out=args.out,
        distill=DistillConfig(temperature=args.temperature, alpha=args.alpha), train=train_config_from_args(args),
        lora=lora, seq_len=args.seq_len, batch_size=args.batch_size, eval_fraction=args.eval_fraction,
        eval_data=args.eval_data, eval_corpus=args.eval_corpus, skip_tokens=args.skip_tokens, seed=args.seed,
        resume=args.resume)
    s = run_distill(config, progress=not args.json)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    key = "corpus_perplexity" if s["eval_corpus"] else "eval_perplexity"
    t, b, a = s["teacher_scores"][key], s["before"][key], s["after"][key]
    scores = ""
    if b is not None:
        where = s["eval_corpus"] or "held-out"
        scores = f"; {where} perplexity {b:.2f} -> {a:.2f} (teacher {t:.2f}"
        scores += f", {100 * s['gap_recovered']:.0f}% of the gap closed)" if s["gap_recovered"] is not None else ")"
    print(f"wrote {s['out']} ({s['training']} training, {s['trainable_parameters']:,} parameters): "
          f"{len(s['losses'])} steps, loss {s['losses'][0]:.3f} -> {s['losses'][-1]:.3f}, "
          f"{s['train_tokens_per_s']:.0f} tokens/s{scores}")
    return 0
