"""`loom finetune`: train a LoRA adapter on a text or chat file (loom.finetune), saved in PEFT's format."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from loom.cli.options import add_source_options, use_threads

if TYPE_CHECKING:
    from loom.finetune.train import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="train a LoRA adapter (PEFT's format) on a text or chat file")
    add_source_options(p)
    p.add_argument("--data", required=True, help="a text file (packed into windows) or .jsonl of {\"messages\"}")
    p.add_argument("--eval-data", default=None, help="a held-out file (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--out", required=True, help="the adapter folder to write")
    p.add_argument("--method", default="lora", choices=["lora", "prompt-tuning", "full"],
                   help="LoRA adapters, a soft prompt of --num-virtual-tokens trainable embeddings, or every "
                        "parameter (full fine-tuning: OUT is then a model folder)")
    d = p.add_argument_group("data parallel")
    d.add_argument("--nproc", type=int, default=1,
                   help="processes to train on (gloo on this machine), each --batch-size examples of every "
                        "global batch; under torchrun, its world instead")
    d.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="DistributedDataParallel (a whole copy per rank) or FSDP (parameters, gradients and "
                        "optimizer state sharded over the ranks)")
    a = p.add_argument_group("LoRA")
    a.add_argument("--r", type=int, default=8)
    a.add_argument("--lora-alpha", type=float, default=16.0)
    a.add_argument("--lora-dropout", type=float, default=0.0)
    a.add_argument("--target-modules", default="all-linear",
                   help="all-linear, or projections separated by commas (q_proj,v_proj,...)")
    a.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    a.add_argument("--qlora", action="store_true", help="QLoRA: the frozen base's decoder linears in NF4")
    g = p.add_argument_group("prompt tuning")
    g.add_argument("--num-virtual-tokens", type=int, default=20)
    g.add_argument("--prompt-init", default="random", choices=["random", "text", "sample_vocab"],
                   help="PEFT's initializations: N(0, 1), a text's embeddings, or embeddings of random tokens")
    g.add_argument("--prompt-init-text", default=None, help="the text of --prompt-init text")
    add_training_options(p)
    p.add_argument("--json", action="store_true")


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The optimizer, schedule, batches and checkpoints (shared by finetune and distill)."""
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-4; 3e-2 for a soft prompt, as PEFT's prompt-tuning example)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup", type=int, default=0, help="warmup steps")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward (less memory, ~1/3 more compute)")
    t.add_argument("--bf16", action="store_true", help="forward and backward under bf16 autocast (AMX); "
                                                       "weights and optimizer state stay fp32")
    t.add_argument("--save-every", type=int, default=0,
                   help="write a resumable checkpoint (OUT/checkpoint) every N optimizer steps")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="go on from a checkpoint an earlier run wrote (same settings and data)")
    t.add_argument("--seed", type=int, default=0)


def train_config_from_args(args: argparse.Namespace, default_lr: float = 2e-4) -> "TrainConfig":
    from loom.finetune.train import TrainConfig

    return TrainConfig(lr=args.lr if args.lr is not None else default_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup, max_steps=args.steps,
                       schedule=args.schedule, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                       activation_checkpointing=args.activation_checkpointing, bf16=args.bf16,
                       save_every=args.save_every)


def run(args: argparse.Namespace) -> int:
    from loom.default_model import default_model_path
    from loom.finetune.lora import LoraConfig
    from loom.finetune.prompt_tuning import PromptTuningConfig
    from loom.finetune.run import FinetuneConfig, finetune
    use_threads(args)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    config = FinetuneConfig(
        model=args.model or default_model_path(), data=args.data, out=args.out, eval_data=args.eval_data,
        eval_fraction=args.eval_fraction, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        qlora=args.qlora, resume=args.resume, method=args.method, nproc=args.nproc, parallel=args.parallel,
        prompt_tuning=PromptTuningConfig(args.num_virtual_tokens, args.prompt_init, args.prompt_init_text,
                                         seed=args.seed),
        lora=LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
                        use_rslora=args.rslora, seed=args.seed),
        train=train_config_from_args(args, 3e-2 if args.method == "prompt-tuning" else 2e-4))
    s = finetune(config, progress=not args.json)
    from loom.finetune.parallel import world_from_env

    world = world_from_env()
    if world is not None and not world.is_main:
        return 0  # under torchrun: rank 0 prints
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    before, after = s["eval_perplexity_before"], s["eval_perplexity_after"]
    held = f"; held-out perplexity {before:.2f} -> {after:.2f}" if before is not None else ""
    print(f"wrote {s['out']} ({s['trainable_parameters']:,} trainable parameters): {len(s['losses'])} steps, "
          f"loss {s['losses'][0]:.3f} -> {s['losses'][-1]:.3f}, {s['train_tokens_per_s']:.0f} tokens/s{held}")
    par = s["parallel"]
    if par["strategy"]:
        print(f"{par['strategy'].upper()} over {par['world_size']} ranks, global batch {par['global_batch_size']}; "
              "parameters + optimizer state held per rank:")
        for m in par["ranks"]:
            print(f"  rank {m['rank']}: parameters {m['parameter_bytes'] / 2**20:.2f} MiB + optimizer state "
                  f"{m['optimizer_state_bytes'] / 2**20:.2f} MiB = {100 * m['fraction_of_one_rank']:.1f}% of one "
                  f"rank's {(m['full_parameter_bytes'] + m['full_optimizer_state_bytes']) / 2**20:.2f} MiB")
    return 0
