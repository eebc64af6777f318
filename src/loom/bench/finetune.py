"""`loom bench finetune --peers peft`: LoRA training speed and loss of loom against HF PEFT + transformers, at
equal settings, from one run.

Both sides train the same adapter (PEFT's initialization, written once by the PEFT side and loaded by
loom's ``LoraModel.load_peft_weights``) on the same windows of a text in the same order, with AdamW, the
same warmup + cosine schedule and gradient clipping. Each side lives in its own process
(``IsolatedPeer``: a crash is reported, not fatal) with the same thread count, and the two take turns,
round after round, so a slow spell of the machine falls on both; every round starts from the initial
adapter, so each round's losses must repeat. A configuration is a compute dtype (fp32, or bf16 autocast
on both sides); the step time is the median over a round's steps after the first, and the figure of a
configuration is the median over rounds, with the spread.

The roof: LoRA's training FLOPs per token are ~ 2 P (forward) + 2 P (the backward's input gradients; the
frozen base has no weight gradients) over the P parameters of the linears (the adapters' own are < 2%),
plus the attention's; ``fraction_of_compute_roof`` reads the achieved FLOP/s against the measured matmul
peak of the dtype (``bench/throughput.measure_peaks``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from loom.bench.isolated import IsolatedPeer, PeerFailed

SIDES = ("loom", "peft")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class FinetuneBenchSettings:
    model: str
    data: str  # a text file
    steps: int = 8
    seq_len: int = 256
    batch_size: int = 4
    r: int = 8
    lr: float = 2e-4
    warmup: int = 2
    threads: int = 2
    seed: int = 0


def _windows(settings: FinetuneBenchSettings, tokenizer: Any) -> list[list[torch.Tensor]]:
    from loom.finetune.data import as_tensors, batches, text_examples

    with open(settings.data, encoding="utf-8") as f:
        examples = text_examples(f.read(), tokenizer, settings.seq_len)
    it = batches(examples, settings.batch_size, settings.seed)
    return [as_tensors(next(it))[0] for _ in range(settings.steps)]


class TrainingSide:
    """One side of the benchmark, built in its own process: the model with its adapter, the data, and
    ``run(dtype)``: ``steps`` optimizer steps from the initial adapter, timed step by step."""

    def __init__(self, side: str, settings: FinetuneBenchSettings, adapter_dir: str) -> None:
        torch.set_num_threads(settings.threads)
        self.side, self.settings = side, settings
        from loom.tokenizer import load_tokenizer
        from loom.weights.loader import load_model

        loaded = load_model(settings.model, weights="fp32")
        self.data = _windows(settings, load_tokenizer(settings.model, loaded.metadata, loaded.config.eos_token_ids))
        self.adapter_dir = adapter_dir
        if side == "peft":
            self._build_peft()
        else:
            from loom.finetune import LoraConfig, attach_lora

            self.model = loaded.model
            self.lora = attach_lora(self.model, LoraConfig(r=settings.r, lora_alpha=2 * settings.r))
            self.params = self.lora.parameters()
            self.lora.load_peft_weights(adapter_dir)
            self.initial = [p.detach().clone() for p in self.params]

    def _build_peft(self) -> None:
        from peft import LoraConfig as PeftConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from loom.bench.peers import hf_reference_copy

        torch.manual_seed(self.settings.seed)
        path = self.settings.model
        hf = AutoModelForCausalLM.from_pretrained(hf_reference_copy(path) if path.endswith(".gguf") else path,
                                                  dtype=torch.float32)
        self.model = get_peft_model(hf, PeftConfig(r=self.settings.r, lora_alpha=2 * self.settings.r,
                                                   target_modules="all-linear", lora_dropout=0.0))
        if not os.path.isfile(os.path.join(self.adapter_dir, "adapter_config.json")):
            self.model.save_pretrained(self.adapter_dir)  # the initialization both sides start from
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]

    def _loss(self, ids: list[torch.Tensor]) -> torch.Tensor:
        if self.side == "peft":
            batch = torch.stack(ids)
            return self.model(input_ids=batch, labels=batch).loss
        from loom.finetune.train import lm_loss

        return lm_loss(self.model, ids)

    def run(self, dtype: str) -> dict[str, Any]:
        from transformers import get_cosine_schedule_with_warmup

        s = self.settings
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        optimizer = torch.optim.AdamW(self.params, lr=s.lr)
        schedule = get_cosine_schedule_with_warmup(optimizer, s.warmup, s.steps)
        self.model.train()
        times, losses = [], []
        for ids in self.data:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = self._loss(ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            times.append(time.perf_counter() - t0)
        self.model.eval()
        tokens = s.batch_size * s.seq_len
        return {"step_seconds": times, "losses": losses,
                "tokens_per_s": tokens / statistics.median(times[1:] if len(times) > 1 else times)}


def training_flops_per_token(model: str, seq_len: int) -> float:
    """~ 4 P_linear + 4 x (causal attention's 2 L d per layer, halved) per token: forward + input gradients."""
    from loom.weights.loader import load_model

    m = load_model(model, weights="fp32").model
    linears = sum(mod.weight.numel() for name, mod in m.named_modules()
                  if hasattr(mod, "weight") and getattr(mod, "weight", None) is not None
                  and mod.weight.dim() == 2 and "embed" not in name)
    cfg = m.config
    linears += cfg.vocab_size * cfg.hidden_size  # the output layer (tied to the embedding here or not)
    attention = cfg.num_layers * 2 * seq_len * cfg.num_heads * cfg.head_dim  # QK^T and PV, causal half of 2x2
    return 4.0 * (linears + attention)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tps = [r["tokens_per_s"] for r in runs]
    return {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps), "rounds": runs}


def run_finetune_bench(settings: FinetuneBenchSettings, peers: Sequence[str] = ("peft",), rounds: int = 3,
                       dtypes: Sequence[str] = DTYPES, progress: bool = True) -> dict[str, Any]:
    """Every dtype of ``dtypes`` for loom and each peer, ``rounds`` alternating rounds each."""
    from loom.bench.throughput import measure_peaks

    unknown = set(peers) - {"peft"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)} (available: peft)")
    if set(dtypes) - set(DTYPES) or rounds < 1 or settings.steps < 2:
        raise ValueError(f"dtypes among {DTYPES}, rounds >= 1 and steps >= 2")
    sides = ["peft", "loom"] if "peft" in peers else ["loom"]
    workers: dict[str, IsolatedPeer | str] = {}
    with tempfile.TemporaryDirectory() as adapter_dir:
        if "peft" not in peers:  # loom alone still starts from PEFT's initialization, written here
            TrainingSide("peft", settings, adapter_dir)
        for side in sides:  # PEFT first: it writes the initial adapter
            try:
                workers[side] = IsolatedPeer(TrainingSide, side, settings, adapter_dir)
            except PeerFailed as e:
                workers[side] = str(e)
        results: dict[str, dict[str, Any]] = {side: {} for side in sides}
        for dtype in dtypes:
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
            for k in range(rounds):
                for side in (sides if k % 2 == 0 else sides[::-1]):  # who goes first alternates
                    w = workers[side]
                    if isinstance(w, str):
                        continue
                    try:
                        runs[side].append(w.call(dtype))
                    except PeerFailed as e:
                        workers[side] = str(e)
                    if progress and runs[side]:
                        print(f"{dtype} round {k + 1}/{rounds} {side}: {runs[side][-1]['tokens_per_s']:.1f} tokens/s",
                              flush=True)
            for side in sides:
                w = workers[side]
                results[side][dtype] = _summary(runs[side]) if runs[side] else {"error": w}
        for w in workers.values():
            if not isinstance(w, str):
                w.close()
    peaks = measure_peaks([{"fp32": "float32", "bf16": "bfloat16"}[d] for d in dtypes], torch.device("cpu"))
    flops = training_flops_per_token(settings.model, settings.seq_len)
    table = []
    for dtype in dtypes:
        row: dict[str, Any] = {"dtype": dtype}
        peak = peaks["peak_matmul_flops"][{"fp32": "float32", "bf16": "bfloat16"}[dtype]]
        for side in sides:
            r = results[side][dtype]
            if "error" in r:
                row[side] = {"error": r["error"]}
                continue
            row[side] = {k: v for k, v in r.items() if k != "rounds"}
            row[side]["fraction_of_compute_roof"] = flops * r["tokens_per_s_median"] / peak
        if "peft" in sides and "error" not in row["peft"] and "error" not in row["loom"]:
            row["loom_vs_peft"] = row["loom"]["tokens_per_s_median"] / row["peft"]["tokens_per_s_median"]
            row["max_loss_difference"] = max(abs(a - b) for rl, rp in zip(results["loom"][dtype]["rounds"],
                                                                          results["peft"][dtype]["rounds"])
                                             for a, b in zip(rl["losses"], rp["losses"]))
        table.append(row)
    out: dict[str, Any] = {"settings": asdict(settings), "rounds": rounds, "flops_per_token": flops, **peaks,
                           "results": table, "runs": results}
    ok = [r for r in table if "loom_vs_peft" in r]
    if ok:
        best = {side: max((r for r in table if "error" not in r[side]), key=lambda r: r[side]["tokens_per_s_median"])
                for side in sides}
        out["best"] = {side: {"dtype": best[side]["dtype"], "tokens_per_s": best[side][side]["tokens_per_s_median"]}
                       for side in sides}
        out["best_vs_best"] = out["best"]["loom"]["tokens_per_s"] / out["best"]["peft"]["tokens_per_s"]
    return out
