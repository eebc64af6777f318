"""ModelRunner: a scheduled batch -> flat tensors -> model -> the logits the engine samples from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loom.engine.kv_cache import KVCache
from loom.engine.scheduler import ScheduledSeq
from loom.engine.sequence import Sequence
from loom.layers.attention import AttentionMetadata
from loom.models.decode_graph import make_decode_graph
from loom.models.transformer import Transformer


@dataclass
class RunnerOutput:
    sample_seqs: list[Sequence]  # sequences whose last known token was computed: they sample now
    logits: torch.Tensor  # [len(sample_seqs), vocab], raw model logits (fp32)
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> logits of this chunk
    # Speculating sequences (their last token and their drafts computed): (seq, logits [1 + k, vocab]).
    verify: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: KVCache, use_graph: bool = True, max_batch: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.layers = kv_cache.layers()
        self.block_size = kv_cache.block_size
        # The scripted step (CPU) or CUDA graphs (GPU) read fp caches; an int8 cache decodes through the
        # modules (kv_quant.py).
        self.graph = make_decode_graph(model, kv_cache, pack_rows=max_batch)
        self.use_graph = use_graph  # decode-only steps run the graph (see decode_graph.py, cuda_graph.py)
        self.device = model.device

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> RunnerOutput:
        """Run each scheduled sequence's next ``num_tokens`` tokens (its drafts, if any, follow its
        last token) and return the logits the engine samples and verifies from."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, context_lens, sample_rows, sample_seqs, verify_rows = [0], [], [], [], []
        evicting = {}
        for i, item in enumerate(scheduled):
            seq, n, c = item.seq, item.num_tokens, item.seq.num_computed
            table = seq.block_table
            source = seq.tokens + seq.draft if seq.draft else seq.tokens
            ids += source[c:c + n]
            if seq.kv_state is not None:  # bounded KV: positions are ranks in its cache, slots its own
                evicting[i] = seq.kv_state
                positions += seq.kv_state.begin_step(table, c, n)
                slots += [-1] * n
            else:
                positions += range(c, c + n)
                slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            context_lens.append(c + n)
            if c + n == len(source):
                if seq.draft:
                    verify_rows.append((seq, starts[-2], n))
                else:
                    sample_rows.append(starts[-1] - 1)
                    sample_seqs.append(seq)
        if not evicting and all(item.num_tokens == 1 or item.seq.draft for item in scheduled):
            # Decodes and verifications only: one row per token, each attending over the context up to
            # itself through its sequence's block table (all rows' K/V are written before any row
            # attends), so the scripted decode step also verifies drafts, reading the weights once.
            tables = [item.seq.block_table for item in scheduled for _ in range(item.num_tokens)]
            logits = self.decode(ids, positions, slots, tables, [p + 1 for p in positions])
            verify = [(seq, logits[s:s + n]) for seq, s, n in verify_rows]
            if len(sample_rows) < len(ids):  # drafts, or a one-token prefill chunk that does not end its prompt
                logits = logits[sample_rows]
            return RunnerOutput(sample_seqs, logits, verify=verify)
        meta = AttentionMetadata(torch.tensor(positions, dtype=torch.long), starts, context_lens, torch.tensor(slots),
                                 _tables([item.seq.block_table for item in scheduled]), evicting).to(self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), meta, self.layers)
        for state in evicting.values():
            state.end_step()
        logits = self.model.compute_logits(hidden[sample_rows]).float()
        prompt_logits = {}
        for i, item in enumerate(scheduled):
            seq = item.seq
            if seq.params.prompt_logprobs is not None and seq.in_prefill:
                prompt_logits[seq.seq_id] = self.model.compute_logits(hidden[starts[i]:starts[i + 1]]).float()
        verify = [(seq, self.model.compute_logits(hidden[s:s + n]).float()) for seq, s, n in verify_rows]
        return RunnerOutput(sample_seqs, logits, prompt_logits, verify)

    @torch.inference_mode()
    def decode(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
               context_lens: list[int]) -> torch.Tensor:
        """One new token per sequence, everything given explicitly (a sequence's block table may be any
        view of its blocks, as self-drafting uses). Returns fp32 logits [B, vocab]."""
        tables_t = _tables(tables)
        positions_t = torch.tensor(positions, dtype=torch.long)
        if self.graph is not None and self.use_graph:
            return self.graph(torch.tensor(ids), positions_t, torch.tensor(slots), tables_t,
                              torch.tensor(context_lens)).float()
        meta = AttentionMetadata(positions_t, list(range(len(ids) + 1)), context_lens, torch.tensor(slots),
                                 tables_t).to(self.device)
        return self.model.compute_logits(self.model(torch.tensor(ids, device=self.device), meta, self.layers)).float()


def _tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables padded with block 0 to one width: [B, max_blocks]."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
