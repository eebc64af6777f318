"""Generation for one request over a contiguous KV cache: prefill the prompt, then one token per step.

This is the simplest correct decoder, the reference the serving engine (engine/engine.py) is tested against:
no scheduler, no block tables, one block as long as the request.
The cache is one block as long as the request can grow (prompt + max_tokens), so attention reads
keys and values as a view, never a copy.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from loom.engine.kv_cache import KVCache
from loom.errors import check_context
from loom.engine.sampler import SamplingRow, make_generator, sample
from loom.engine.text_output import TextOutput, accept_token
from loom.layers.attention import AttentionMetadata
from loom.engine.step import DecodeBatch, ScriptedStep, llama_shaped
from loom.models.transformer import Transformer
from loom.outputs import StreamDelta, Timings
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer


class Generator:
    """Streams one completion at a time from a model and its tokenizer."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, context: int | None = None,
                 scripted: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Decode steps run the scripted step when the model's shape allows (engine/step/scripted.py).
        self.use_graph = scripted and llama_shaped(model)
        self.context = context or model.config.max_position_embeddings
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) or tuple(model.config.eos_token_ids)

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
               timings: Timings | None = None) -> Iterator[StreamDelta]:
        prompt_ids = list(prompt_ids)
        budget = check_context(len(prompt_ids), params.max_tokens, self.context)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        timings = timings if timings is not None else Timings()
        timings.prompt_tokens = len(prompt_ids)
        start = time.perf_counter()

        capacity = len(prompt_ids) + budget
        dev = self.model.device
        cache = KVCache(self.model.config, num_blocks=1, block_size=capacity, dtype=self.model.dtype, device=dev)
        layers = cache.layers()
        table = torch.zeros(1, 1, dtype=torch.long, device=dev)
        row = SamplingRow(params, prompt_ids, [], make_generator(params.seed) if not params.greedy else None,
                          self.eos_token_ids)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        text = TextOutput(self.tokenizer, prompt_ids, params)

        n = len(prompt_ids)
        meta = AttentionMetadata(positions=torch.arange(n, device=dev), query_start=[0, n], context_lens=[n],
                                 slot_mapping=torch.arange(n, device=dev), block_tables=table)
        input_ids = torch.tensor(prompt_ids, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, meta, layers)
        logits = self.model.compute_logits(hidden[-1:])
        graph = ScriptedStep(self.model, cache.k, cache.v) if self.use_graph else None
        output: list[int] = row.output_ids  # type: ignore[assignment]
        decode_start = None
        while True:
            token = sample(logits, [row])[0]
            output.append(token)
            if decode_start is None:
                decode_start = time.perf_counter()
                timings.prefill = decode_start - start
            timings.generated_tokens = len(output)
            delta, finish, reason = accept_token(text, token, len(output), budget, stop_ids)
            if finish is not None:
                timings.decode = time.perf_counter() - decode_start
                yield StreamDelta(delta, [token], finish, reason)
                return
            yield StreamDelta(delta, [token])
            pos = n + len(output) - 1
            if graph is not None:
                # the one block holds the whole request: slot = position
                logits = graph(DecodeBatch(torch.tensor([token]), torch.tensor([pos]), torch.tensor([pos]), table,
                                           torch.tensor([pos + 1])))
                continue
            meta = AttentionMetadata(positions=torch.tensor([pos], device=dev), query_start=[0, 1],
                                     context_lens=[pos + 1], slot_mapping=torch.tensor([pos], device=dev),
                                     block_tables=table)
            hidden = self.model(torch.tensor([token], device=dev), meta, layers)
            logits = self.model.compute_logits(hidden)
