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


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: KVCache, use_graph: bool = True) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.layers = kv_cache.layers()
        self.block_size = kv_cache.block_size
        # The scripted step (CPU) or CUDA graphs (GPU) read fp caches; an int8 cache decodes through the
        # modules (kv_quant.py).
        self.graph = make_decode_graph(model, kv_cache)
        self.use_graph = use_graph  # decode-only steps run the graph (see decode_graph.py, cuda_graph.py)
        self.device = model.device

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> RunnerOutput:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, context_lens, sample_rows, sample_seqs = [0], [], [], []
        for item in scheduled:
            seq, n, c = item.seq, item.num_tokens, item.seq.num_computed
            table = seq.block_table
            ids += seq.tokens[c:c + n]
            positions += range(c, c + n)
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            context_lens.append(c + n)
            if c + n == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
                sample_seqs.append(seq)
        width = max(len(item.seq.block_table) for item in scheduled)
        tables = torch.tensor([item.seq.block_table + [0] * (width - len(item.seq.block_table))
                               for item in scheduled], dtype=torch.long)
        positions_t = torch.tensor(positions, dtype=torch.long)
        if self.graph is not None and self.use_graph and len(ids) == len(scheduled):  # all decodes
            logits = self.graph(torch.tensor(ids), positions_t, torch.tensor(slots), tables,
                                torch.tensor(context_lens))
            return RunnerOutput(sample_seqs, logits.float())
        meta = AttentionMetadata(positions_t, starts, context_lens, torch.tensor(slots), tables).to(self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), meta, self.layers)
        logits = self.model.compute_logits(hidden[sample_rows]).float()
        prompt_logits = {}
        for i, item in enumerate(scheduled):
            seq = item.seq
            if seq.params.prompt_logprobs is not None and seq.in_prefill:
                prompt_logits[seq.seq_id] = self.model.compute_logits(hidden[starts[i]:starts[i + 1]]).float()
        return RunnerOutput(sample_seqs, logits, prompt_logits)
