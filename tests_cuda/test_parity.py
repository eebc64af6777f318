"""loom on CUDA against HF transformers on CUDA, same random SmolLM2-config weights."""

from __future__ import annotations

import torch

from loom import SamplingParams

PROMPT = torch.randint(3, 49152, (150,), generator=torch.Generator().manual_seed(1)).tolist()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@torch.inference_mode()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids], device="cuda")).logits[0].float()


def test_defaults_on_cuda(llm32, llm16):
    assert llm32.model.device.type == "cuda" and llm32.model.dtype == torch.float32
    assert llm16.model.dtype == torch.bfloat16  # the CUDA default
    assert llm16.engine.kv_cache.k.device.type == "cuda" and llm16.engine.kv_cache.k.dtype == torch.bfloat16
    assert [s.name for s in llm16.engine.runner.steps] == ["cuda_graph", "module"]


def test_fp32_logits_equal_hf(llm32, hf32):
    with torch.inference_mode():
        got = llm32.model.logits(torch.tensor(PROMPT, device="cuda")).float()
    assert _rel(got, _hf_logits(hf32, PROMPT)) < 1e-3


def test_bf16_logits_within_bf16_rounding_of_hf(llm16, hf32, smol_dir):
    from transformers import AutoModelForCausalLM

    want = _hf_logits(hf32, PROMPT)
    with torch.inference_mode():
        got = llm16.model.logits(torch.tensor(PROMPT, device="cuda")).float()
    hf16 = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).eval().to("cuda")
    hf_err = _rel(_hf_logits(hf16, PROMPT), want)
    loom_err = _rel(got, want)
    print(f"bf16 vs HF fp32: loom {loom_err:.2e}, HF bf16 {hf_err:.2e}")
    assert loom_err < 3e-2 and loom_err < 2 * hf_err + 5e-3


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_fp32_greedy_64_tokens_equal_hf_with_and_without_cuda_graphs(llm32, hf32):
    want = _hf_greedy(hf32, PROMPT[:40], 64)
    p = SamplingParams(temperature=0, max_tokens=64, min_tokens=64)
    assert llm32.engine.runner.steps[0].name == "cuda_graph"
    graphs = llm32.generate([PROMPT[:40]], p)[0].outputs[0].token_ids
    llm32.engine.runner.prefer("module")
    try:
        eager = llm32.generate([PROMPT[:40]], p)[0].outputs[0].token_ids
    finally:
        llm32.engine.runner.prefer(None)
    assert graphs == want
    assert eager == want


def test_reference_decoder_on_cuda_equals_the_engine(llm32):
    from loom.engine.generate import Generator

    p = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    ref = [t for d in Generator(llm32.model, llm32.tokenizer).stream(PROMPT[:30], p) for t in d.token_ids]
    assert ref == llm32.generate([PROMPT[:30]], p)[0].outputs[0].token_ids
