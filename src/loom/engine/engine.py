"""LLMEngine: requests in, token deltas out, one scheduler iteration per ``step()``.

    engine.add_request("a", "The capital of France is", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for delta in engine.step():
            print(delta.request_id, delta.index, delta.text, delta.finish_reason)

A step: schedule (which sequences compute how many tokens) -> copy-on-write copies -> drafts, when
speculating -> one model forward over the flat batch -> sample the sequences that reached their last
token, verify the drafts of speculating ones -> detokenize, check stops, free the blocks of finished
sequences -> deltas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence as Seq

import torch

from loom.config import CacheConfig, EngineConfig, KVPolicyConfig, SchedulerConfig
from loom.engine.adapters import Adapter, AdapterError, AdapterPool
from loom.weights.lora import LoraPairs
from loom.engine.block_manager import BlockManager
from loom.engine.kv_cache import KVCache
from loom.engine.kv_policy import EvictingKV
from loom.engine.runner import ModelRunner
from loom.engine.sampler import SamplingRow, make_generator, sample, top_logprobs
from loom.engine.scheduler import Scheduler
from loom.engine.sequence import EvictionState, Request, Sequence, SequenceStatus
from loom.engine.speculative import SpeculativeStats, Speculator
from loom.engine.structured import GrammarBackend
from loom.engine.text_output import TextOutput, accept_token
from loom.errors import InvalidPromptError, InvalidRequestError, QueueFullError, check_context
from loom.layers.moe import expert_token_counts
from loom.models.transformer import Transformer
from loom.outputs import Logprob, PositionLogprobs, StreamDelta
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer


MIN_LOGPROB = -9999.0  # the floor of a reported logprob (vLLM's)
log = logging.getLogger("loom.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_computed: int  # prompt tokens run through the model (prefix-cache hits excluded)
    prompt_tokens_cached: int  # prompt tokens found in the prefix cache
    generation_tokens: int
    steps: int
    # continuous batching at work: the most sequences one step ran, and the steps that ran more than one (under a
    # memory budget, each such step reads the streamed layers once for all of them)
    max_sequences_per_step: int = 0
    multi_sequence_steps: int = 0
    speculative: SpeculativeStats | None = None  # acceptance and tokens per pass, when speculating
    # MoE models: per MoE layer (layer index -> one count per expert), the tokens its router sent to each expert
    # since the model was loaded, every forward counted (prompt chunks, decodes, speculative verification)
    expert_tokens: dict[int, list[int]] | None = None


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 kv_calibration_ids: Seq[int] | None = None, offload: Any = None) -> None:
        """``config``: the cache, scheduler, decode step, speculative decoding and KV policy (its loading
        fields say how ``model`` was loaded; the engine does not read them). ``kv_calibration_ids``:
        tokens whose keys fix an int8 KV cache's per-channel key scales (needed with
        ``kv_dtype="int8"``; ``LLM`` passes the start of the calibration corpus). ``offload``: the residency
        plan and layer stream of a model under a memory budget (engine/offload.py), reported by ``describe``."""
        config = config or EngineConfig()
        self.model = model
        self.offload = offload
        self.tokenizer = tokenizer
        context = min(config.scheduler.max_model_len or model.config.max_position_embeddings,
                      model.config.max_position_embeddings)
        self.kv_cache = self._make_kv_cache(config, context)
        if self.kv_cache.quantized:
            if not kv_calibration_ids:
                raise ValueError("an int8 KV cache needs kv_calibration_ids: tokens whose keys fix its key scales")
            self.kv_cache.calibrate_key_scales(model, list(kv_calibration_ids))
        self.block_manager = BlockManager(self.kv_cache.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.max_model_len = min(config.scheduler.max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings, self.kv_cache.num_tokens)
        if not config.scheduler.enable_chunked_prefill:
            # Without chunking a whole prompt (or a preempted sequence's whole history) must fit one step.
            config = replace(config, scheduler=replace(config.scheduler, max_num_batched_tokens=max(
                config.scheduler.max_num_batched_tokens, self.max_model_len)))
        self.config = config
        self.adapters = None if config.lora_serving is None else AdapterPool(model, config.lora_serving)
        self.runner = self._build_runner(config)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) or tuple(model.config.eos_token_ids)
        self.speculator = None if config.speculative is None else Speculator(
            config.speculative, self.runner, self.kv_cache.num_blocks, self.eos_token_ids, config.decode_step)
        # constrained sequences are not speculated: drafts would have to be checked against the grammar too
        draft_tokens = None if self.speculator is None else (
            lambda seq: 0 if seq.params.structured_output is not None
            else self.speculator.num_draft_tokens(seq, self.max_model_len))  # type: ignore[union-attr]
        self.scheduler = Scheduler(config.scheduler, self.block_manager, draft_tokens, self.adapters)
        kv_policy = config.kv_policy
        self.kv_policy = kv_policy if kv_policy is not None and kv_policy.bounded else None
        if self.kv_policy is not None:
            self.check_kv_policy(self.kv_policy)
        log.info("%s", self.describe())
        self.requests: dict[str, Request] = {}
        self._grammars: GrammarBackend | None = None  # built on the first constrained request (~1 s)
        self._pending: list[StreamDelta] = []
        self._next_seq_id = 0
        self.prompt_tokens_computed = 0
        self.prompt_tokens_cached = 0
        self.generation_tokens = 0
        self.steps = 0
        self.max_sequences_per_step = 0
        self.multi_sequence_steps = 0
        self.lora_requests: dict[str, int] = {}  # adapter name -> requests received for it

    def _make_kv_cache(self, config: EngineConfig, context: int) -> KVCache:
        """The paged KV cache, sized by ``config.cache`` (engine/parallel/ allocates a shard on every rank)."""
        return KVCache.from_config(self.model.config, config.cache, self.model.dtype, self.model.device, context)

    def _build_runner(self, config: EngineConfig) -> ModelRunner:
        """What turns a scheduled batch into logits (engine/encoder_decoder.py has its own for T5)."""
        # under a memory budget layers stream one by one: the compiled steps would hold every layer's weights
        decode_step = "module" if config.memory_budget is not None else config.decode_step
        return ModelRunner(self.model, self.kv_cache, decode_step, max_batch=config.scheduler.max_num_seqs,
                           adapters=self.adapters)

    @property
    def embedding_model(self) -> Transformer:
        """The model embedders run (a tensor-parallel engine gives a forward that runs on every rank)."""
        return self.model

    def health_problem(self) -> str | None:
        """Why the engine can no longer run (None: healthy); a tensor-parallel engine that lost a rank says so."""
        return None

    def shutdown(self) -> None:
        """Release what the engine holds beyond memory (a tensor-parallel engine stops its workers)."""

    def _release_request(self, request: Request) -> None:
        """A request left the engine (finished or aborted): free what it holds besides its sequences' blocks
        (nothing here; an encoder-decoder engine's cross-attention keys and values)."""

    @property
    def cache_config(self) -> CacheConfig:
        return self.config.cache

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return self.config.scheduler

    def describe(self) -> str:
        kv = self.kv_cache
        text = (f"KV cache: {kv.num_blocks} blocks of {kv.block_size} tokens = {kv.num_tokens} tokens, "
                f"{kv.nbytes / 2**30:.2f} GiB ({'int8' if kv.quantized else str(kv.dtype).replace('torch.', '')}); "
                f"max model len {self.max_model_len}")
        text = f"{text}; decode steps: {self.runner.describe_steps()}"
        return text if self.offload is None else f"{text}; {self.offload.describe()}"

    def check_kv_policy(self, policy: KVPolicyConfig) -> None:
        """Raise ValueError if this engine cannot run sequences under ``policy`` (a bounded one)."""
        c = self.model.config
        why = None
        if c.position != "rope" or c.sliding_window is not None:
            why = f"needs a RoPE model without its own sliding window (position={c.position!r})"
        elif c.is_mla:
            why = "does not run over latent attention's cache (it evicts and re-rotates per-head keys)"
        elif self.kv_cache.quantized:
            why = "does not run over the int8 KV cache"
        elif self.speculator is not None:
            why = "and speculative decoding cannot be combined"
        elif policy.capacity > c.max_position_embeddings:
            why = (f"needs budget + prefill_chunk = {policy.capacity} <= the model's context "
                   f"({c.max_position_embeddings}): cache positions must stay inside it")
        elif policy.prefill_chunk > self.scheduler_config.max_num_batched_tokens:
            why = (f"prefill_chunk {policy.prefill_chunk} exceeds max_num_batched_tokens "
                   f"{self.scheduler_config.max_num_batched_tokens}")
        elif -(-policy.capacity // self.kv_cache.block_size) > self.kv_cache.num_blocks:
            why = f"needs {policy.capacity} tokens of KV cache; the cache holds {self.kv_cache.num_tokens}"
        if why is not None:
            raise ValueError(f"KV policy {policy.kind!r} {why}")

    def _request_policy(self, params: SamplingParams) -> KVPolicyConfig | None:
        policy = params.kv_policy if params.kv_policy is not None else self.kv_policy
        if policy is None or not policy.bounded:
            return None
        if policy is not self.kv_policy:
            self.check_kv_policy(policy)
        return policy

    # Requests ---------------------------------------------------------------------------------

    def _new_sequence(self, request_id: str, index: int, tokens: list[int], prompt_len: int,
                      params: SamplingParams, arrival: float) -> Sequence:
        seed = None if params.seed is None else (params.seed + index) % (1 << 64)
        seq = Sequence(seq_id=self._next_seq_id, request_id=request_id, index=index, tokens=tokens,
                       prompt_len=prompt_len, params=params, arrival=arrival,
                       text=TextOutput(self.tokenizer, tokens[:prompt_len], params),
                       generator=None if params.greedy else make_generator(seed))
        self._next_seq_id += 1
        return seq

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None,
                    lora: str | None = None) -> int:
        """Queue a request (text, or token ids), under the LoRA adapter named ``lora`` (None: the base
        model). Returns its prompt length; raises ValueError on a bad request (and QueueFullError when the
        waiting queue is at its limit), changing nothing."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        adapter = None if lora is None else self.adapter(lora)
        limit = self.scheduler_config.max_waiting
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are waiting (limit {limit})")
        vocab = self.model.config.vocab_size
        params.check_vocabulary(vocab)
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)  # refused here, before it is queued
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidPromptError(f"prompt token ids must be in [0, {vocab})")
        policy = self._request_policy(params)
        if policy is None:
            # max_model_len never exceeds the cache's capacity, so a request that fits it fits the cache alone.
            max_tokens = check_context(len(ids), params.max_tokens, self.max_model_len)
        else:  # bounded memory: any length; positions stay inside the cache
            max_tokens = check_context(len(ids), params.max_tokens, 2**62) if params.max_tokens else self.max_model_len
        now = time.perf_counter()
        # Bounded sequences overwrite their own slots and cannot share a prompt's blocks: each of the n
        # completions computes the prompt itself.
        count = params.n if policy is not None else 1
        seqs = [self._new_sequence(request_id, i, list(ids), len(ids), params, now) for i in range(count)]
        for seq in seqs:
            seq.max_tokens = max_tokens
            seq.eviction = None if policy is None else EvictionState(policy)
            seq.adapter = adapter
        if adapter is not None:
            self.lora_requests[adapter.name] = self.lora_requests.get(adapter.name, 0) + 1
        request = Request(request_id, prompt if isinstance(prompt, str) else None, list(ids), params, seqs)
        request.metrics.arrival = now
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        return len(ids)

    # Adapters -------------------------------------------------------------------------------------

    def adapter(self, name: str) -> Adapter:
        """The loaded adapter called ``name``; AdapterError (a bad request) if there is none."""
        if self.adapters is None:
            raise AdapterError(f"this engine serves no LoRA adapters (asked for {name!r}): start it with "
                               "lora_serving (loom serve --lora-modules name=DIR)", param="model")
        return self.adapters.get(name)

    def read_lora(self, name: str, path: str) -> LoraPairs:
        """Read and check an adapter folder for ``add_lora`` without touching the engine (any thread)."""
        if self.adapters is None:
            raise AdapterError("this engine serves no LoRA adapters: start it with lora_serving")
        return self.adapters.read(name, path)

    def add_lora(self, name: str, path: str, pairs: LoraPairs | None = None) -> Adapter:
        """Load the PEFT adapter folder ``path`` as ``name`` for later requests (AdapterError if it cannot be);
        ``pairs``: what ``read_lora`` read from it, if it was read already."""
        if self.adapters is None:
            raise AdapterError("this engine serves no LoRA adapters: start it with lora_serving")
        return self.adapters.add(name, path, pairs)

    def remove_lora(self, name: str) -> Adapter:
        """Unload ``name``: requests already queued or running under it finish; new ones are refused."""
        if self.adapters is None:
            raise AdapterError("this engine serves no LoRA adapters")
        return self.adapters.remove(name)

    def list_loras(self) -> list[Adapter]:
        return [] if self.adapters is None else list(self.adapters.registered.values())

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now; its blocks are freed and its streams end with finish_reason "abort"."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        request.aborted = True
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                if seq.eviction is not None:
                    seq.eviction.kv = None
                if self.speculator is not None:
                    self.speculator.release(seq)
                self._pending.append(StreamDelta("", [], "abort", None, request_id, seq.index))
        self._release_request(request)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # The step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        deltas, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("nothing can be scheduled although requests wait (KV cache too small?)")
            return deltas
        self.steps += 1
        n_seqs = len(sched.scheduled)
        self.max_sequences_per_step = max(self.max_sequences_per_step, n_seqs)
        self.multi_sequence_steps += n_seqs > 1
        start = time.perf_counter()
        decode_only = self.speculator is not None and all(
            item.seq.num_computed == item.seq.num_tokens - 1 for item in sched.scheduled)  # timed for the stats
        self.kv_cache.copy_blocks(sched.copies)
        for item in sched.scheduled:
            seq = item.seq
            if seq.eviction is not None and (seq.eviction.kv is None or seq.num_computed == 0):
                seq.eviction.kv = self._new_kv_state(seq.eviction.policy)  # first step, or again after a preemption
        reserved = [item.seq for item in sched.scheduled if item.num_draft]
        if reserved:
            self.speculator.propose(sched.scheduled)  # type: ignore[union-attr]
        out = self.runner.execute(sched.scheduled)
        now = time.perf_counter()
        for item in sched.scheduled:
            seq, n = item.seq, item.num_tokens - item.num_draft  # drafts count once verified
            request = self.requests[seq.request_id]
            if request.metrics.first_scheduled is None:
                request.metrics.first_scheduled = now
                request.metrics.cached_prompt_tokens = seq.num_computed
                self.prompt_tokens_cached += seq.num_computed
            if seq.num_computed < seq.prompt_len:
                computed = min(n, seq.prompt_len - seq.num_computed)
                request.metrics.prompt_tokens_computed += computed
                self.prompt_tokens_computed += computed
            if seq.seq_id in out.prompt_logits:
                self._add_prompt_logprobs(request, seq, out.prompt_logits[seq.seq_id])
            seq.num_computed += n
            self.block_manager.register_computed(seq)
        for seq in reserved:
            if not seq.draft_tokens:  # given fewer drafts than slots (none): the slots go back now
                self.block_manager.trim(seq)
        if out.sample_seqs:
            deltas += self._sample(out.sample_seqs, out.logits, now)
        for seq, logits in out.verify:
            deltas.append(self._verify(seq, logits, now))
        if decode_only:
            tokens = sum(len(d.token_ids) for d in deltas)
            self.speculator.stats.record_step(time.perf_counter() - start, tokens, bool(out.verify))  # type: ignore[union-attr]
        return deltas

    def _new_kv_state(self, policy: KVPolicyConfig) -> EvictingKV:
        c = self.model.config
        return EvictingKV(policy, c.num_layers, c.num_kv_heads, self.kv_cache.block_size, self.kv_cache.device)

    def _verify(self, seq: Sequence, logits: torch.Tensor, now: float) -> StreamDelta:
        """A speculating sequence: keep m drafts and one token of the target's, count the K/V of the kept
        drafts as computed, and give back the slots of the rejected ones (here and in a draft cache)."""
        assert self.speculator is not None
        m, tokens = self.speculator.verify(seq, logits)
        logprobs = None
        if seq.params.logprobs is not None:
            entries = top_logprobs(logits[: m + 1], tokens, seq.params.logprobs)
            logprobs = [self._logprob_dict(e) for e in entries]
        delta = self._append(seq, tokens, logprobs, now)
        if not seq.is_finished:
            seq.num_computed += m
            self.block_manager.trim(seq)
            self.block_manager.register_computed(seq)
            self.speculator.rollback(seq)
        return delta

    def _fork(self, request: Request, parent: Sequence) -> list[Sequence]:
        """The other n - 1 completions of a request, sharing the parent's blocks (prompt prefilled once)."""
        children = []
        for index in range(1, request.params.n):
            child = self._new_sequence(request.request_id, index, list(parent.tokens), parent.prompt_len,
                                       request.params, parent.arrival)
            child.max_tokens = parent.max_tokens
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            request.seqs.append(child)
            children.append(child)
        return children

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, now: float) -> list[StreamDelta]:
        group, rows = [], []
        for i, seq in enumerate(seqs):
            request = self.requests[seq.request_id]
            members = [seq]
            if request.params.n > 1 and len(request.seqs) == 1:
                members += self._fork(request, seq)
            group += members
            rows += [i] * len(members)
        if len(group) != len(seqs):
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
        constrained = [(i, self._matcher(seq)) for i, seq in enumerate(group)
                       if seq.params.structured_output is not None]
        if constrained:
            self.grammars.mask(logits, constrained)
        sampling_rows = []
        for seq in group:
            p = seq.params
            history = p.has_penalties  # only penalties look at the tokens so far (min_tokens at the count)
            sampling_rows.append(SamplingRow(p, seq.prompt_ids if history else (),
                                             seq.output_ids if history or p.min_tokens else (),
                                             seq.generator, self.eos_token_ids,
                                             constrained=p.structured_output is not None))
        tokens = sample(logits, sampling_rows)
        refused = {i for i, matcher in constrained if not self.grammars.advance(matcher, tokens[i])}
        want = [i for i, seq in enumerate(group) if seq.params.logprobs is not None]
        logprobs: dict[int, PositionLogprobs] = {}
        if want:
            top_n = max(group[i].params.logprobs for i in want)
            entries = top_logprobs(logits[torch.tensor(want, device=logits.device)], [tokens[i] for i in want], top_n)
            for i, entry in zip(want, entries):
                k = group[i].params.logprobs
                logprobs[i] = self._logprob_dict([entry[0]] + [e for e in entry[1:] if e[2] <= k])
        deltas = []
        for i, (seq, token) in enumerate(zip(group, tokens)):
            if i in refused:  # the constraint allowed no token (see GrammarBackend.advance): end it, unemitted
                log.warning("request %s: its constraint allowed no token; aborted", seq.request_id)
                self.abort_request(seq.request_id)
            if seq.request_id not in self.requests:  # aborted just now (this sequence or a sibling)
                continue
            entry = logprobs.get(i)
            deltas.append(self._append(seq, [token], None if entry is None else [entry], now))
        return deltas

    @property
    def grammars(self) -> GrammarBackend:
        """The constrained-decoding backend (engine/structured.py), built on first use."""
        if self._grammars is None:
            self._grammars = GrammarBackend(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)
        return self._grammars

    def _matcher(self, seq: Sequence) -> object:
        if seq.grammar is None:
            seq.grammar = self.grammars.matcher(seq.params.structured_output)  # type: ignore[arg-type]
        return seq.grammar

    def _logprob_dict(self, entry: list[tuple[int, float, int]]) -> PositionLogprobs:
        # a token a constraint rules out has logprob -inf, which JSON cannot carry: floored as vLLM does
        return {t: Logprob(max(lp, MIN_LOGPROB), rank, self.tokenizer.decode([t])) for t, lp, rank in entry}

    def _add_prompt_logprobs(self, request: Request, seq: Sequence, logits: torch.Tensor) -> None:
        """Logits at positions c..c+n-1 predict prompt tokens c+1..c+n (those inside the prompt). After a
        preemption the prompt is computed again: positions already reported are skipped."""
        c = seq.num_computed
        first = len(request.prompt_logprobs)  # the next prompt position without an entry
        end = min(c + 1 + logits.shape[0], seq.prompt_len)
        if end <= first:
            return
        assert first >= c + 1, "prompt positions before this chunk have no logprobs"
        rows = logits[first - 1 - c: end - 1 - c]
        entries = top_logprobs(rows, seq.tokens[first:end], request.params.prompt_logprobs)
        request.prompt_logprobs += [self._logprob_dict(e) for e in entries]

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[PositionLogprobs] | None,
                now: float) -> StreamDelta:
        """Append tokens to ``seq`` one by one until one of them ends it; one delta for all of them."""
        request = self.requests[seq.request_id]
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        request.metrics.last_token = now
        stop_ids = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(self.eos_token_ids))
        text, finish, reason, taken = "", None, None, 0
        for token in tokens:
            seq.tokens.append(token)
            self.generation_tokens += 1
            taken += 1
            piece, finish, reason = accept_token(seq.text, token, seq.num_output, seq.max_tokens, stop_ids)
            if finish is None and seq.grammar is not None and seq.grammar.is_stopped():  # type: ignore[attr-defined]
                piece, finish = piece + seq.text.finish(), "stop"  # the text is complete: nothing else is allowed
            text += piece
            if finish is not None:
                break
        delta = StreamDelta(text, tokens[:taken], finish, reason, seq.request_id, seq.index,
                            logprobs[:taken] if logprobs is not None else None)
        if seq.index == 0 and not request.prompt_logprobs_sent:
            request.prompt_logprobs_sent = True
            delta.prompt_token_ids = request.prompt_ids
            delta.prompt_logprobs = request.prompt_logprobs
        if finish is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason, seq.stop_reason = finish, reason
            if seq.eviction is not None:
                seq.eviction.kv = None
            self.scheduler.remove(seq)
            if self.speculator is not None:
                self.speculator.release(seq)
            if request.is_finished:
                request.metrics.finished = now
                del self.requests[seq.request_id]
                self._release_request(request)
        return delta

    # Introspection ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks, kv_blocks_cached=bm.num_cached_blocks,
            prefix_cache_hit_rate=bm.prefix_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_computed=self.prompt_tokens_computed, prompt_tokens_cached=self.prompt_tokens_cached,
            generation_tokens=self.generation_tokens, steps=self.steps,
            max_sequences_per_step=self.max_sequences_per_step, multi_sequence_steps=self.multi_sequence_steps,
            speculative=None if self.speculator is None else self.speculator.stats,
            expert_tokens=expert_token_counts(self.model) if self.model.config.num_experts else None)

    def live_sequences(self) -> list[Sequence]:
        return [s for r in self.requests.values() for s in r.seqs if not s.is_finished]
