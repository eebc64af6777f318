"""ModelRunner: a scheduled batch -> flat tensors -> a step -> the logits the engine samples from.

Decode-only batches (every row one new token: decodes and draft verifications) go to the first of the
runner's decode steps (engine/step/) that supports them; batches with prefill chunks, and bounded
(evicting) sequences, run the module forward.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from loom.engine.adapters import AdapterPool
from loom.engine.kv_cache import KVCache
from loom.engine.scheduler import ScheduledSeq
from loom.engine.sequence import Sequence
from loom.engine.step import DecodeBatch, DecodeStep, ModuleStep, build_decode_steps, pad_tables
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

log = logging.getLogger("loom.engine")


@dataclass
class RunnerOutput:
    sample_seqs: list[Sequence]  # sequences whose last known token was computed: they sample now
    logits: torch.Tensor  # [len(sample_seqs), vocab], raw model logits (fp32)
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> logits of this chunk
    # Speculating sequences (their last token and their drafts computed): (seq, logits [1 + k, vocab]).
    verify: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)


def mkl_pack_rows(max_batch: int) -> int:
    """The row count of the opt-in MKL-packed second copy of dense fp32 weights (LOOM_PACK_WEIGHTS=mkl), else 0."""
    return max_batch if os.environ.get("LOOM_PACK_WEIGHTS", "1") == "mkl" else 0


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: KVCache, decode_step: str = "auto", max_batch: int = 0,
                 adapters: AdapterPool | None = None) -> None:
        """``decode_step``: "auto" (the fastest steps that take the model), or one step's name (see
        engine/step/__init__.py). ``max_batch``: the engine's max_num_seqs; with LOOM_PACK_WEIGHTS=mkl the
        scripted step also holds dense fp32 weights MKL-packed for batches of that many rows (a second copy
        of every weight: 1.3-1.4x faster fp32 GEMMs at 64 rows; off by default, one copy). ``adapters``: the
        LoRA slots rows of a batch compute under (each sequence's ``lora_slot``)."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        scales = (kv_cache.k_scale, kv_cache.v_scale, kv_cache.v_zero) if kv_cache.quantized else None
        self.steps: list[DecodeStep] = build_decode_steps(model, kv_cache.k, kv_cache.v, kv_cache.layers(),
                                                          decode_step, pack_rows=mkl_pack_rows(max_batch),
                                                          lora=None if adapters is None else adapters.layers,
                                                          lora_hooks=None if adapters is None else adapters.hooks,
                                                          kv_scales=scales)
        self.module: ModuleStep = self.steps[-1]  # type: ignore[assignment]
        self._preferred = self.steps
        self.last_decode_step: str | None = None  # the step that ran the last decode batch
        log.info("decode steps: %s", self.describe_steps())

    def describe_steps(self) -> str:
        """E.g. "native (decode batches of <= 32) > scripted > module; prefill: module"."""
        return " > ".join(s.describe() for s in self._preferred) + "; prefill: module"

    def step(self, name: str) -> DecodeStep:
        """The built step called ``name`` (KeyError if the runner has none)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no {name!r} decode step (built: {', '.join(s.name for s in self.steps)})")

    def prefer(self, name: str | None) -> None:
        """Run decode batches through step ``name`` (and the module step for what it does not support);
        None restores the built order. Benchmarks use it to time one step against another."""
        self._preferred = self.steps if name is None else [self.step(name), self.module]

    def decode_step_for(self, batch: DecodeBatch) -> DecodeStep:
        return next(s for s in self._preferred if s.supports(batch))

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> RunnerOutput:
        """Run each scheduled sequence's next ``num_tokens`` tokens (its drafts, if any, follow its
        last token) and return the logits the engine samples and verifies from."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, context_lens, sample_rows, sample_seqs, verify_rows = [0], [], [], [], []
        lora_slots: list[list[int]] = [[], [], [], []]  # per linear (q|k|v, o, gate|up, down), per row
        evicting = {}
        for i, item in enumerate(scheduled):
            seq, n, c = item.seq, item.num_tokens, item.seq.num_computed
            table = seq.block_table
            source = seq.tokens + seq.draft_tokens if seq.draft_tokens else seq.tokens
            ids += source[c:c + n]
            if seq.eviction is not None:  # bounded KV: positions are ranks in its cache, slots its own
                evicting[i] = seq.eviction.kv
                positions += seq.eviction.kv.begin_step(table, c, n)
                slots += [-1] * n
            else:
                positions += range(c, c + n)
                slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            context_lens.append(c + n)
            for kind, row in enumerate(lora_slots):  # -1 where the row's adapter leaves the linear alone
                adapts = seq.lora_slot is not None and seq.adapter.linears[kind]  # type: ignore[union-attr]
                row += [seq.lora_slot if adapts else -1] * n  # type: ignore[list-item]
            if c + n == len(source):
                if seq.draft_tokens:
                    verify_rows.append((seq, starts[-2], n))
                else:
                    sample_rows.append(starts[-1] - 1)
                    sample_seqs.append(seq)
        adapted = any(s >= 0 for row in lora_slots for s in row)
        if not evicting and all(item.num_tokens == 1 or item.seq.draft_tokens for item in scheduled):
            # Decodes and verifications only: one row per token, each attending over the context up to
            # itself through its sequence's block table (all rows' K/V are written before any row
            # attends), so a decode step also verifies drafts, reading the weights once.
            tables = [item.seq.block_table for item in scheduled for _ in range(item.num_tokens)]
            batch = DecodeBatch.of(ids, positions, slots, tables, [p + 1 for p in positions])
            if adapted:
                batch = replace(batch, lora_slots=torch.tensor(lora_slots))
            logits = self.decode(batch)
            verify = [(seq, logits[s:s + n]) for seq, s, n in verify_rows]
            if len(sample_rows) < len(ids):  # drafts, or a one-token prefill chunk that does not end its prompt
                logits = logits[sample_rows]
            return RunnerOutput(sample_seqs, logits, verify=verify)
        meta = AttentionMetadata(torch.tensor(positions, dtype=torch.long), starts, context_lens, torch.tensor(slots),
                                 pad_tables([item.seq.block_table for item in scheduled]), evicting)
        hidden = self.module.forward(torch.tensor(ids), meta, torch.tensor(lora_slots) if adapted else None)
        for state in evicting.values():
            state.end_step()
        logits = self.module.logits(hidden[sample_rows])
        prompt_logits = {}
        for i, item in enumerate(scheduled):
            seq = item.seq
            if seq.params.prompt_logprobs is not None and seq.in_prefill:
                prompt_logits[seq.seq_id] = self.module.logits(hidden[starts[i]:starts[i + 1]])
        verify = [(seq, self.module.logits(hidden[s:s + n])) for seq, s, n in verify_rows]
        return RunnerOutput(sample_seqs, logits, prompt_logits, verify)

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One new token per row, everything given explicitly (a row's block table may be any view of
        its sequence's blocks, as self-drafting uses). Returns fp32 logits [B, vocab]."""
        step = self.decode_step_for(batch)
        self.last_decode_step = step.name
        return step(batch).float()
