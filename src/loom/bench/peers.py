"""Peers measured beside loom: HF transformers (the reference and the usual baseline).

HF reads GGUF itself (dequantizing every tensor, ~20-45 s), so the first use converts the GGUF once
into an fp32 safetensors folder under the cache directory, reused afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from typing import Iterator, Sequence

import torch

from loom.analysis.runs import LatencySample
from loom.cache import cache_dir


def hf_reference_copy(gguf_path: str, folder: str | None = None) -> str:
    """An fp32 HF checkpoint (config, safetensors, tokenizer) made by transformers from ``gguf_path``.

    Everything in it (dequantization, Q/K un-permutation, tokenizer) is transformers' own work,
    which is what makes it an independent reference for loom's GGUF loader.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = folder or os.path.join(cache_dir(), "hf-from-gguf", key)
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # The loaded model remembers it came from GGUF and refuses to save; rebuild a plain one.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(cfg))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(folder)
    open(done, "w").close()
    return folder


class HFGenerate:
    """HF ``generate`` (greedy, exactly gen_len new tokens) on one prompt: what a user of HF would run."""

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(device)
        self.dtype = dtype

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> HFGenerate:
        """Wrap an already-built (e.g. quantized by a peer library) HF model."""
        obj = cls.__new__(cls)
        obj.model, obj.dtype = model, next(model.parameters()).dtype
        obj.grad_mode = torch.no_grad  # some peer libraries' tensors refuse inference mode
        return obj

    grad_mode = torch.inference_mode

    def run(self, prompt_ids: Sequence[int], gen_len: int) -> LatencySample:
        from loom.device import synchronize

        dev = next(self.model.parameters()).device
        ids = torch.tensor([list(prompt_ids)], device=dev)
        kwargs = dict(do_sample=False, pad_token_id=self.model.config.eos_token_id)
        with self.grad_mode():
            synchronize(dev)
            t = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            synchronize(dev)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            self.model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kwargs)
            synchronize(dev)
            total = time.perf_counter() - t
        return LatencySample(prefill, (gen_len - 1) / max(total - prefill, 1e-9))


@contextlib.contextmanager
def _no_extra_buffer_types() -> Iterator[None]:
    """While a ``Llama`` is built: its model parameters start with ``use_extra_bufts = False``."""
    import llama_cpp.llama_cpp as bindings

    default = bindings.llama_model_default_params
    fields = {name for name, *_ in getattr(bindings.llama_model_params, "_fields_", [])}

    def params():  # type: ignore[no-untyped-def]
        p = default()
        if "use_extra_bufts" in fields:
            p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


class LlamaCppGenerate:
    """llama.cpp (through llama-cpp-python, an optional peer) on the same GGUF: greedy, exactly gen_len tokens.

    ``use_extra_bufts=False`` keeps llama.cpp off its AMX / repacked-buffer path, which dies with SIGILL
    on the project's machines (``tilezero`` in ggml_backend_amx_mul_mat, run in a worker thread);
    everything else is llama.cpp's default CPU path with ``threads`` threads. Bindings whose ``Llama``
    swallows unknown keywords (llama-cpp-python 0.3.36) get it through the model parameters instead.
    """

    def __init__(self, gguf_path: str, threads: int, n_ctx: int = 2048) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise RuntimeError("the llamacpp peer needs llama-cpp-python: `make peers` "
                               "(pip install llama-cpp-python; it compiles llama.cpp, ~10 minutes)") from e
        kwargs = dict(model_path=gguf_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                      logits_all=False)
        with _no_extra_buffer_types():
            self.llm = Llama(**kwargs)

    def run(self, prompt_ids: Sequence[int], gen_len: int) -> LatencySample:
        self.llm.reset()
        t = time.perf_counter()
        count, first = 0, 0.0
        for _ in self.llm.generate(list(prompt_ids), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                   reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter() - t  # prefill + the first sampled token
            if count == gen_len:
                break
        total = time.perf_counter() - t
        return LatencySample(first, (gen_len - 1) / max(total - first, 1e-9))
