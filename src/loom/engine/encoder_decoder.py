"""Serving an encoder-decoder model (T5, models/t5.py) with the decoder-only engine's machinery.

How a T5 request maps onto the engine:

    request prompt (text or ids)  ->  the encoder's input (the source); the request's ``prompt_ids``
    each of its n sequences       ->  the decoder's tokens: [decoder_start_token_id, generated...], a decoder
                                      sequence whose "prompt" is that one start token

To the scheduler, block manager, sampler, stop checks, detokenizer and n > 1 forking a T5 sequence is then an
ordinary decoder sequence: it is admitted, prefilled (its one start token), decoded in continuous batches with
any other requests, preempted (its blocks freed) and recomputed as theirs are, and its decoder self-attention
keys and values live in loom's paged KV cache. What is encoder-decoder specific is two small pieces here, put
into ``LLMEngine`` through two hooks (``_build_runner``, ``_release_request``), with no conditionals in it:

- ``CrossAttentionCache``: request id -> its cross-attention keys and values (``CrossKV``: every decoder layer's
  enc W_k, enc W_v). The encoder runs once per request, on the first step that schedules one of its sequences;
  the K/V are kept while the request lives, shared by its n sequences and kept across preemptions (a preempted
  sequence recomputes only its decoder tokens' self-attention K/V, so the encoder never runs twice); they are
  dropped when the request finishes or is aborted.
- ``EncoderDecoderRunner``: the runner's ``execute`` for a T5 model: the scheduled sequences' decoder tokens as
  one flat batch (positions, slot mapping, block tables, as ``ModelRunner`` builds them), each row's
  cross-attention K/V beside it (``CrossBatch``), the model's forward, the logits of the rows that sample.

``EncoderDecoderEngine`` is the ``LLMEngine`` that uses them: it turns a request's prompt into the source and the
decoder's start token, and refuses what does not apply or is not implemented for encoder-decoder models, by name:
speculative decoding, KV eviction policies, an int8 KV cache, per-request LoRA adapters, prompt logprobs (the
prompt is the encoder's input: the decoder predicts none of it). Prefix caching is turned off: a decoder block's
K/V depend on the request's source through cross-attention, which the prefix cache's block hashes (decoder
tokens only) cannot see, so blocks of two requests starting from the same start token must not be shared.

Memory: the cross-attention K/V of a request take 2 x decoder layers x heads x d_kv x source tokens elements,
outside the paged KV cache's block budget (``CrossAttentionCache.nbytes``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence as Seq

import torch

from loom.config import EngineConfig, KVPolicyConfig
from loom.engine.engine import LLMEngine
from loom.engine.kv_cache import KVCache
from loom.engine.runner import RunnerOutput
from loom.engine.scheduler import ScheduledSeq
from loom.engine.sequence import Request
from loom.engine.step import pad_tables
from loom.errors import ContextLengthError, InvalidPromptError, InvalidRequestError
from loom.layers.attention import AttentionMetadata
from loom.models.t5 import T5, CrossBatch, CrossKV
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer


class CrossAttentionCache:
    """Each live request's source ids and, once its encoder has run, its cross-attention keys and values."""

    def __init__(self, model: T5) -> None:
        self.model = model
        self.sources: dict[str, list[int]] = {}
        self.entries: dict[str, CrossKV] = {}
        self.num_encoded = 0  # encoder runs so far (one per request)

    def add(self, request_id: str, source_ids: Seq[int]) -> None:
        self.sources[request_id] = list(source_ids)

    @torch.inference_mode()
    def get(self, request_id: str) -> CrossKV:
        """The request's cross-attention K/V, running its encoder if it has not run yet."""
        kv = self.entries.get(request_id)
        if kv is None:
            ids = torch.tensor(self.sources[request_id], dtype=torch.long, device=self.model.device)
            kv = self.entries[request_id] = self.model.cross_kv(self.model.encode(ids))
            self.num_encoded += 1
        return kv

    def free(self, request_id: str) -> None:
        self.sources.pop(request_id, None)
        self.entries.pop(request_id, None)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def nbytes(self) -> int:
        """Bytes of the cross-attention K/V held now."""
        return sum(kv.nbytes for kv in self.entries.values())


class EncoderDecoderRunner:
    """Scheduled decoder sequences -> one flat decoder forward over the paged KV cache -> sampling logits."""

    def __init__(self, model: T5, kv_cache: KVCache, cross: CrossAttentionCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.cross = cross
        self.block_size = kv_cache.block_size
        self.caches = kv_cache.layers()
        self.last_decode_step: str | None = None

    def describe_steps(self) -> str:
        return "module (encoder-decoder: cross-attention K/V once per request)"

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> RunnerOutput:
        """Run each scheduled sequence's next ``num_tokens`` decoder tokens (after running the encoder of any request
        seen for the first time) and return the logits of the sequences that reached their last token."""
        bs, dev = self.block_size, self.model.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, context_lens, sample_rows, sample_seqs, cross = [0], [], [], [], []
        for item in scheduled:
            seq, n, c = item.seq, item.num_tokens, item.seq.num_computed
            ids += seq.tokens[c:c + n]
            positions += range(c, c + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            context_lens.append(c + n)
            cross.append(self.cross.get(seq.request_id))
            if c + n == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata(torch.tensor(positions, dtype=torch.long, device=dev), starts, context_lens,
                                 torch.tensor(slots, dtype=torch.long, device=dev),
                                 pad_tables([item.seq.block_table for item in scheduled]).to(dev))
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev), meta, self.caches,
                            CrossBatch(cross, starts))
        self.last_decode_step = "module"
        return RunnerOutput(sample_seqs, self.model.compute_logits(hidden[sample_rows]).float())


class EncoderDecoderEngine(LLMEngine):
    """``LLMEngine`` for a T5 model: the prompt is the encoder's input, the sequences are the decoder's."""

    def __init__(self, model: T5, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        refused = {"speculative decoding": config.speculative is not None,
                   "a KV eviction policy (kv_policy)": config.kv_policy is not None and config.kv_policy.bounded,
                   "per-request LoRA adapters (lora_serving)": config.lora_serving is not None,
                   "an int8 KV cache (kv_dtype='int8')": config.cache.kv_dtype == "int8",
                   f"decode step {config.decode_step!r}": config.decode_step not in ("auto", "module")}
        for what, asked in refused.items():
            if asked:
                raise ValueError(f"{what} is not supported for encoder-decoder models ({model.config.architecture})")
        # decoder blocks depend on the source through cross-attention: they are never shared between requests
        config = replace(config, cache=replace(config.cache, enable_prefix_caching=False))
        self.cross = CrossAttentionCache(model)
        super().__init__(model, tokenizer, config)
        self.max_source_len = min(config.scheduler.max_model_len or model.config.max_position_embeddings,
                                  model.config.max_position_embeddings)

    def _build_runner(self, config: EngineConfig) -> EncoderDecoderRunner:  # type: ignore[override]
        return EncoderDecoderRunner(self.model, self.kv_cache, self.cross)  # type: ignore[arg-type]

    def _release_request(self, request: Request) -> None:
        self.cross.free(request.request_id)

    def check_kv_policy(self, policy: KVPolicyConfig) -> None:
        raise InvalidRequestError(f"KV policy {policy.kind!r} is not supported for encoder-decoder models",
                                  param="kv_policy")

    def describe(self) -> str:
        return (f"{super().describe()}; cross-attention K/V: {len(self.cross.entries)} requests, "
                f"{self.cross.nbytes / 2**20:.1f} MiB")

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None,
                    lora: str | None = None) -> int:
        """Queue a request whose prompt (text, or token ids) is the encoder's input; its sequences start from the
        decoder start token. Returns the prompt's length; raises ValueError on a bad request, changing nothing."""
        params = params or SamplingParams()
        if params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs: an encoder-decoder model's prompt is its encoder's input, "
                                      "which the decoder does not predict", param="prompt_logprobs")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise InvalidPromptError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidPromptError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) > self.max_source_len:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; this model's encoder takes at most "
                                     f"{self.max_source_len}")
        super().add_request(request_id, [self.model.config.decoder_start_token_id], params, lora)
        request = self.requests[request_id]
        request.prompt, request.prompt_ids = (prompt if isinstance(prompt, str) else None), ids
        self.cross.add(request_id, ids)
        return len(ids)
