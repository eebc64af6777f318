"""The CUDA-graph step: decode batches on a GPU replayed from CUDA graphs.

Why: decoding a small model one token at a time is launch-bound on a GPU. A SmolLM2-135M step is
some 700 kernels (30 layers of norms, GEMVs, RoPE, cache writes, attention), each a few
microseconds of GPU work but tens of microseconds of Python and dispatcher time to launch
eagerly, while the weights stream in about 0.1 ms at HBM speed. A CUDA graph records the step's
kernels once and replays them with one launch (the CUDA analogue of the CPU's scripted step,
scripted.py).

A graph fixes every shape and address, so the step is written to need neither host reads nor
data-dependent shapes: ``decode_forward`` runs the model's own modules (norms, linears of any
format, MLP) around a cache write and ``paged_decode_attention_masked``, which attends over a block
table of fixed width with the positions past each context masked. One graph is captured per
(batch size, table width rounded up to a power of two) the first time it is needed; all graphs
share one memory pool. Inputs travel as one packed int64 tensor copied into the graph's static
buffer before each replay. Tests hold the replayed logits equal to the module path's.

``compile=True`` (an experiment, off by default) records ``torch.compile(decode_forward)`` instead:
Inductor fuses the elementwise ops into fewer kernels, at the price of a compile per graph shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.engine.step.base import DecodeBatch, DecodeStep
from loom.layers.kernels import decode_visibility, paged_decode_attention_masked
from loom.models.transformer import Transformer


def decode_forward(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   block_tables: torch.Tensor, context_lens: torch.Tensor, k_cache: list[torch.Tensor],
                   v_cache: list[torch.Tensor]) -> torch.Tensor:
    """Logits [B, vocab] (model dtype) for one new token per sequence; writes each token's K/V at its slot.

    The same arithmetic as ``Transformer.forward`` for pre-norm models over a paged cache, with no
    value read back to the host (capturable).
    """
    b = tokens.shape[0]
    h = model.embed(tokens, positions)
    rope = model.rotary.lookup(positions, h.dtype) if model.rotary is not None else None
    length = block_tables.shape[1] * k_cache[0].shape[1]
    masks: dict[int, torch.Tensor] = {}  # one visibility mask per window size, shared by the layers
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = attn.qkv_proj(layer.attn_norm(h)).view(b, hq + 2 * hkv, d)
        qk = attn.rotary.apply(qkv[:, : hq + hkv], rope) if rope is not None else qkv[:, : hq + hkv]
        k_cache[i].view(-1, hkv, d).index_copy_(0, slots, qk[:, hq:])
        v_cache[i].view(-1, hkv, d).index_copy_(0, slots, qkv[:, hq + hkv:])
        window = attn.window or 0
        if window not in masks:
            masks[window] = decode_visibility(context_lens, length, window)
        a = paged_decode_attention_masked(qk[:, :hq], k_cache[i], v_cache[i], block_tables, context_lens,
                                          attn.scale, window, masks[window])
        h = h + attn.o_proj(a.reshape(b, hq * d))
        h = h + layer.mlp(layer.mlp_norm(h))
    return model.compute_logits(h if model.norm is None else model.norm(h))


def width_bucket(width: int) -> int:
    """Block-table widths are padded to the next power of two: few graphs, at most 2x the gathered keys."""
    return 1 << max(0, width - 1).bit_length()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # packed: tokens, positions, slots, context lens [4B], then the table [B * W]
    logits: torch.Tensor


class CudaGraphStep(DecodeStep):
    """Decode batches over a paged KV cache on a GPU, replayed from CUDA graphs (host tensors in, fp32
    logits out); batches larger than ``max_batch`` run the same forward eagerly."""

    name = "cuda_graph"

    def __init__(self, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 max_batch: int = 512, compile: bool = False) -> None:
        if not self.takes(model):
            raise ValueError("CudaGraphStep needs a pre-norm model without ALiBi on a CUDA device")
        self.model = model
        self.device = model.device
        self.k = [k_cache[i] for i in range(k_cache.shape[0])]
        self.v = [v_cache[i] for i in range(v_cache.shape[0])]
        self.max_batch = max_batch
        if model.rotary is not None:  # graphs index the tables; they must never grow inside one
            model.rotary.ensure(model.config.max_position_embeddings + 1)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.forward = torch.compile(decode_forward, dynamic=False) if compile else decode_forward

    @staticmethod
    def takes(model: Transformer) -> bool:
        c = model.config
        # not MoE (its dispatch has data-dependent shapes), QK-norm nor latent attention (decode_forward has none)
        return (model.device.type == "cuda" and c.norm_placement == "pre" and c.position != "alibi"
                and not c.qk_norm and c.rope_local_theta is None and not c.num_experts and not c.qk_norm_full
                and not c.is_mla)

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        """Returns fp32 logits [B, V] (a fresh tensor, not the graph's buffer); the batch's tensors may be
        on the host or the device."""
        tokens, positions, slots, block_tables, context_lens = (batch.tokens, batch.positions, batch.slots,
                                                                batch.block_tables, batch.context_lens)
        b, width = tokens.shape[0], block_tables.shape[1]
        if b > self.max_batch:  # no graph this large: the same step, launched eagerly
            dev = self.device
            logits = decode_forward(self.model, tokens.to(dev), positions.to(dev), slots.to(dev),
                                    block_tables.to(dev), context_lens.to(dev), self.k, self.v)
            return logits.float()
        w = width_bucket(width)
        tables = block_tables.cpu()
        if w > width:  # padding entries point at block 0; the context lengths mask them out
            tables = torch.cat([tables, torch.zeros(b, w - width, dtype=tables.dtype)], dim=1)
        packed = torch.cat([tokens.cpu(), positions.cpu(), slots.cpu(), context_lens.cpu(), tables.reshape(-1)])
        entry = self.graphs.get((b, w))
        if entry is None:
            entry = self.graphs[(b, w)] = self._capture(b, w, packed)
        entry.inputs.copy_(packed)
        entry.graph.replay()
        return entry.logits.to(torch.float32, copy=True)

    def _step(self, inputs: torch.Tensor, b: int, w: int) -> torch.Tensor:
        tokens, positions, slots, lens = (inputs[i * b:(i + 1) * b] for i in range(4))
        tables = inputs[4 * b:].view(b, w)
        return self.forward(self.model, tokens, positions, slots, tables, lens, self.k, self.v)

    def _capture(self, b: int, w: int, packed: torch.Tensor) -> _Captured:
        """Warm up once eagerly on a side stream (library handles, workspaces), then record the step.

        The warm-up computes the real step (it writes this step's K/V, which the first replay writes
        again with the same values); the capture itself runs nothing.
        """
        inputs = packed.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(inputs, b, w)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(inputs, b, w)
        return _Captured(graph, inputs, logits)
