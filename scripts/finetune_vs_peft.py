"""LoRA training speed and loss of loom against PEFT + transformers at equal settings, on SmolLM2-135M (fp32)
and a Shakespeare play: the same windows in the same order, the same initialization (PEFT's A and B copied
into loom's pairs), AdamW, the same schedule; tokens/s per optimizer step (median after the first) and the
loss of every step side by side. Run it on a quiet machine.

    python scripts/finetune_vs_peft.py [--steps 12] [--seq-len 256] [--batch-size 4] [--r 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loom.bench.peers import hf_reference_copy
from loom.default_model import default_model_path
from loom.eval.corpora import data_root
from loom.finetune import LoraConfig, TrainConfig, attach_lora, train
from loom.finetune.data import as_tensors, batches, text_examples
from loom.tokenizer import load_tokenizer
from loom.weights.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig as PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    path = default_model_path()
    loaded = load_model(path, weights="fp32")
    tok = load_tokenizer(path, loaded.metadata, loaded.config.eos_token_ids)
    with open(f"{data_root()}/texts/macbeth_gut.txt", encoding="utf-8") as f:
        examples = text_examples(f.read(), tok, args.seq_len)
    it = batches(examples, args.batch_size, seed=0)
    data = [as_tensors(next(it)) for _ in range(args.steps)]

    hf = AutoModelForCausalLM.from_pretrained(hf_reference_copy(path), dtype=torch.float32)
    peft = get_peft_model(hf, PeftConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    lora = attach_lora(loaded.model, LoraConfig(r=args.r, lora_alpha=2 * args.r))
    peft_params = dict(peft.named_parameters())
    with torch.no_grad():
        for name, module in lora.modules.items():
            layer, hf_module = name.split(".")[1], {"attn": "self_attn", "mlp": "mlp"}[name.split(".")[2]]
            for part in module.lora_A:
                base = f"base_model.model.model.layers.{layer}.{hf_module}.{part}"
                module.lora_A[part].copy_(peft_params[f"{base}.lora_A.default.weight"])
                module.lora_B[part].copy_(peft_params[f"{base}.lora_B.default.weight"])

    config = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=2)
    loom_times: list[float] = []
    last = [time.perf_counter()]

    def tick(_log) -> None:
        now = time.perf_counter()
        loom_times.append(now - last[0])
        last[0] = now

    loom_logs = train(loaded.model, lora.parameters(), iter(data), config, on_step=tick)

    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, 2, args.steps)
    peft.train()
    peft_losses, peft_times = [], []
    for ids, _ in data:
        t0 = time.perf_counter()
        batch = torch.stack(ids)
        loss = peft(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        peft_losses.append(loss.item())
        peft_times.append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    loom_tps = [tokens / t for t in loom_times[1:]]
    peft_tps = [tokens / t for t in peft_times[1:]]
    result = {"settings": vars(args), "loom": {"tokens_per_s_median": statistics.median(loom_tps),
                                               "tokens_per_s": loom_tps, "losses": [g.loss for g in loom_logs]},
              "peft": {"tokens_per_s_median": statistics.median(peft_tps), "tokens_per_s": peft_tps,
                       "losses": peft_losses},
              "max_loss_difference": max(abs(a.loss - b) for a, b in zip(loom_logs, peft_losses))}
    result["loom_vs_peft"] = result["loom"]["tokens_per_s_median"] / result["peft"]["tokens_per_s_median"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
