"""Per-request LoRA adapters (engine/adapters.py): a served adapter computes what PEFT and the merged model
compute, a batch mixing adapters equals each request alone (with chunked prefill, preemption and few
slots), the prefix cache never shares K/V between adapters or loads, and loading / unloading under load
loses nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import CacheConfig, LoraServingConfig, SchedulerConfig
from loom.engine.adapters import AdapterError
from tests.helpers import peft_adapter, save_tiny_hf, tiny_base_with_adapters

# (target modules, rank) of the four test adapters: every projection, attention only, MLP only, a mix
ADAPTERS = [("all-linear", 4), (["q_proj", "v_proj"], 8), (["gate_proj", "down_proj"], 2),
            (["o_proj", "k_proj", "up_proj"], 16)]
NAMES = [f"a{i}" for i in range(len(ADAPTERS))]
PROMPTS = [[(7 * k + 3 * j) % 250 + 1 for j in range(5 + 3 * k)] for k in range(16)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama (GQA) with a byte-level tokenizer, and four PEFT adapters saved by PEFT itself."""
    return tiny_base_with_adapters(tmp_path_factory.mktemp("adapters"), dict(zip(NAMES, ADAPTERS)))


def served(tiny, max_loras: int = 4, **options) -> LLM:
    config = LoraServingConfig(max_loras=max_loras, max_lora_rank=16, modules=tuple((n, tiny[n]) for n in NAMES))
    return LLM(tiny["base"], weights="fp32", lora_serving=config, **options)


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


@pytest.fixture(scope="module")
def merged(tiny) -> dict[str | None, list[list[int]]]:
    """Each prompt's greedy tokens under the adapter merged into the weights (``--lora``), and without."""
    out = {name: tokens(LLM(tiny["base"], weights="fp32", lora=tiny[name]).generate(PROMPTS, GREEDY))
           for name in NAMES}
    out[None] = tokens(LLM(tiny["base"], weights="fp32").generate(PROMPTS, GREEDY))
    return out


def test_served_logits_equal_peft_and_the_merged_model(tiny):
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    llm = served(tiny)
    ids = PROMPTS[5]
    pool, model = llm.engine.adapters, llm.model
    for name in NAMES:
        slot = pool.acquire(pool.get(name))
        with pool.hooks.using(torch.full((len(ids),), slot)), torch.no_grad():
            got = model.logits(torch.tensor(ids))
        pool.release(pool.get(name))
        hf = AutoModelForCausalLM.from_pretrained(tiny["base"], torch_dtype=torch.float32)
        with torch.no_grad():
            reference = PeftModel.from_pretrained(hf, tiny[name]).eval()(torch.tensor([ids])).logits[0]
        merged_model = LLM(tiny["base"], weights="fp32", lora=tiny[name]).model
        with torch.no_grad():
            torch.testing.assert_close(got, merged_model.logits(torch.tensor(ids)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = model.logits(torch.tensor(ids))
    assert (base - got).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("decode_step", ["auto", "module"])
def test_a_mixed_batch_equals_each_request_alone_and_the_merged_models(tiny, merged, decode_step):
    llm = served(tiny, decode_step=decode_step)
    # which linears each adapter's rows compute (the others read -1 for its rows: nothing to add)
    assert [llm.engine.adapter(n).linears for n in NAMES] == [
        (True, True, True, True), (True, False, False, False), (False, False, True, True), (True, True, True, False)]
    names = [[None, *NAMES][k % 5] for k in range(len(PROMPTS))]  # 16 requests: 4 adapters and the base model
    batched = tokens(llm.generate(PROMPTS, GREEDY, lora=names))
    assert batched == [merged[n][k] for k, n in enumerate(names)]
    alone = [tokens(llm.generate([p], GREEDY, lora=n))[0] for p, n in zip(PROMPTS, names)]
    assert alone == batched
    assert llm.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill_preemption_and_two_slots_change_nothing(tiny, merged):
    """Prompts cut into 8-token chunks, a KV cache too small for the batch (preemptions), and two slots for
    four adapters (LRU reloads): the same tokens."""
    llm = served(tiny, max_loras=2, cache=CacheConfig(block_size=4, num_blocks=24),
                 scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8))
    names = [[None, *NAMES][k % 5] for k in range(len(PROMPTS))]
    assert tokens(llm.generate(PROMPTS, GREEDY, lora=names)) == [merged[n][k] for k, n in enumerate(names)]
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0 and engine.adapters.loads > 2
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_caching_keys_blocks_by_adapter(tiny, merged):
    """The same long prompt under two adapters and the base model, one after the other with the prefix cache
    on: each gets its own output, so no adapter found another's blocks; the same adapter again hits."""
    llm = served(tiny, cache=CacheConfig(block_size=4, enable_prefix_caching=True))
    prompt, k = PROMPTS[15], 15
    for name in (NAMES[0], NAMES[1], None, NAMES[0]):
        assert tokens(llm.generate([prompt], GREEDY, lora=name))[0] == merged[name][k]
    bm = llm.engine.block_manager
    assert bm.prefix_hits == (len(prompt) - 1) // 4  # only the second a0 request found cached blocks


def test_a_reloaded_adapter_never_reuses_stale_blocks(tiny, merged):
    """Unload a0 and load a1's weights under the name a0: requests for a0 now compute a1's tokens, although
    the blocks of the first a0's prompt are still in the prefix cache."""
    llm = served(tiny, cache=CacheConfig(block_size=4, enable_prefix_caching=True))
    prompt, k = PROMPTS[15], 15
    assert tokens(llm.generate([prompt], GREEDY, lora="a0"))[0] == merged["a0"][k]
    llm.remove_lora("a0")
    llm.add_lora("a0", tiny["a1"])
    assert tokens(llm.generate([prompt], GREEDY, lora="a0"))[0] == merged["a1"][k]


def test_unloading_under_load_finishes_what_runs_and_refuses_what_comes(tiny, merged):
    llm = served(tiny)
    engine = llm.engine
    for k in range(6):
        engine.add_request(str(k), PROMPTS[k], GREEDY, lora=NAMES[k % 2])
    got: dict[str, list[int]] = {}

    def step() -> None:
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)

    for _ in range(3):
        step()  # a0's and a1's requests are running
    engine.remove_lora("a0")
    assert "a0" not in [a.name for a in engine.list_loras()]
    with pytest.raises(AdapterError, match="no adapter named 'a0'"):
        engine.add_request("late", PROMPTS[0], GREEDY, lora="a0")
    while engine.has_unfinished_requests():
        step()
    assert [got[str(k)] for k in range(6)] == [merged[NAMES[k % 2]][k] for k in range(6)]
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants([])
    assert engine.adapters.active == [] and engine.adapters.slot(engine.adapter("a1")) is not None
    assert engine.lora_requests == {"a0": 3, "a1": 3}


def test_host_memory_keeps_max_cpu_loras_and_rereads_the_rest(tiny, merged):
    config = LoraServingConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=2,
                               modules=tuple((n, tiny[n]) for n in NAMES))
    llm = LLM(tiny["base"], weights="fp32", lora_serving=config)
    assert len(llm.engine.adapters._host) == 2
    names = [NAMES[k % 4] for k in range(8)]
    assert tokens(llm.generate(PROMPTS[:8], GREEDY, lora=names)) == [merged[n][k] for k, n in enumerate(names)]
    assert len(llm.engine.adapters._host) == 2


def _rewrite(folder: str, dest: str, change) -> str:
    import shutil

    shutil.copytree(folder, dest)
    path = os.path.join(dest, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return dest


def test_adapters_that_cannot_be_served_are_refused_clearly(tiny, tmp_path):
    llm = served(tiny)
    engine = llm.engine
    with pytest.raises(AdapterError, match="already loaded"):
        engine.add_lora("a0", tiny["a1"])
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        engine.add_request("x", PROMPTS[0], GREEDY, lora="nope")
    small = LLM(tiny["base"], weights="fp32", lora_serving=LoraServingConfig(max_lora_rank=8))
    with pytest.raises(AdapterError, match="rank 16 .* above --max-lora-rank 8"):
        small.add_lora("big", tiny["a3"])
    other = tmp_path / "other"
    hf = save_tiny_hf(str(tmp_path / "hf-other"), num_key_value_heads=2, hidden_size=32)
    peft_adapter(hf, other)
    with pytest.raises(AdapterError, match="another model"):
        engine.add_lora("other", str(other))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.add_lora("empty", str(tmp_path))
    dora = _rewrite(tiny["a0"], str(tmp_path / "dora"), lambda c: c.update(use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        engine.add_lora("dora", dora)
    with pytest.raises(AdapterError, match="no adapter named 'gone'"):
        engine.remove_lora("gone")
    plain = LLM(tiny["base"], weights="fp32")
    with pytest.raises(AdapterError, match="serves no LoRA adapters"):
        plain.generate(PROMPTS[:1], GREEDY, lora="a0")
    assert [a.name for a in engine.list_loras()] == NAMES  # nothing half-added


def test_a_quantized_base_serves_adapters_unmerged(tiny, tmp_path):
    """A 4-bit GGUF runs on its own int4 codes with adapters on top (what merging cannot do): logits equal the
    dequantized weights' with the adapter merged, and a mixed batch gives each request's tokens alone."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import byte_level_vocab_meta, write_llama_gguf

    path = str(tmp_path / "q4.gguf")
    write_llama_gguf(path, AutoModelForCausalLM.from_pretrained(tiny["base"]), "Q4_0",
                     tokenizer_meta=byte_level_vocab_meta())
    config = LoraServingConfig(max_lora_rank=16, modules=tuple((n, tiny[n]) for n in NAMES), dtype="float32")
    llm = LLM(path, weights="native", lora_serving=config)
    pool = llm.engine.adapters
    assert pool.dtype == torch.float32
    for name in NAMES:
        dense = LLM(path, weights="fp32", lora=tiny[name]).model
        slot = pool.acquire(pool.get(name))
        for prompt in PROMPTS[7], PROMPTS[1]:
            ids = torch.tensor(prompt)
            with pool.hooks.using(torch.full((len(ids),), slot)), torch.no_grad():
                torch.testing.assert_close(llm.model.logits(ids), dense.logits(ids), rtol=1e-4, atol=1e-4)
        pool.release(pool.get(name))
    names = [[None, *NAMES][k % 5] for k in range(len(PROMPTS))]
    batched = tokens(llm.generate(PROMPTS, GREEDY, lora=names))
    assert batched[:5] == [tokens(llm.generate([p], GREEDY, lora=n))[0] for p, n in zip(PROMPTS[:5], names)]


def test_adapters_on_a_quantized_base_default_to_bf16_slots(tiny, tmp_path):
    """lora dtype "auto": bf16 slots on a 4-bit base (the adapter rounded to bf16, the rest exact), the model's
    dtype on a dense one; bf16 slots give the fp32 slots' logits to bf16's rounding of A and B."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import byte_level_vocab_meta, write_llama_gguf

    path = str(tmp_path / "q4.gguf")
    write_llama_gguf(path, AutoModelForCausalLM.from_pretrained(tiny["base"]), "Q4_0",
                     tokenizer_meta=byte_level_vocab_meta())
    modules = tuple((n, tiny[n]) for n in NAMES)
    auto = LLM(path, weights="native", lora_serving=LoraServingConfig(modules=modules))
    exact = LLM(path, weights="native", lora_serving=LoraServingConfig(modules=modules, dtype="float32"))
    assert auto.engine.adapters.dtype == torch.bfloat16
    assert served(tiny).engine.adapters.dtype == torch.float32  # a dense fp32 base: exact slots
    ids = torch.tensor(PROMPTS[9])
    for name in NAMES:
        got = []
        for llm in (auto, exact):
            pool = llm.engine.adapters
            slot = pool.acquire(pool.get(name))
            with pool.hooks.using(torch.full((len(ids),), slot)), torch.no_grad():
                got.append(llm.model.logits(ids))
            pool.release(pool.get(name))
        torch.testing.assert_close(got[0], got[1], rtol=0, atol=2e-2)
    names = [[None, *NAMES][k % 5] for k in range(len(PROMPTS))]
    batched = tokens(auto.generate(PROMPTS, GREEDY, lora=names))
    assert batched[:5] == [tokens(auto.generate([p], GREEDY, lora=n))[0] for p, n in zip(PROMPTS[:5], names)]


def test_bounded_kv_sequences_run_under_their_adapters(tiny):
    """A KV eviction policy (StreamingLLM, budget 16) with adapters: each request's tokens equal the merged
    model's under the same policy (its sequences run the module forward, whose hooks add the adapters)."""
    from loom.config import KVPolicyConfig

    policy = KVPolicyConfig(kind="streaming", budget=16, sink_tokens=4, prefill_chunk=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, kv_policy=policy)
    names = [None, *NAMES]
    prompts = [PROMPTS[11 + k] for k in range(5)]
    got = tokens(served(tiny).generate(prompts, params, lora=names))
    for prompt, name, out in zip(prompts, names, got):
        merged_llm = LLM(tiny["base"], weights="fp32", lora=None if name is None else tiny[name])
        assert out == tokens(merged_llm.generate([prompt], params))[0]
