"""`loom bench throughput --loras K` (bench/lora.py): its random adapters are real PEFT adapters (PEFT loads
them and computes what loom serves), and the benchmark reports the mixed-adapter run beside the base one."""

from __future__ import annotations

import pytest
import torch

from loom import LLM
from loom.bench.lora import adapter_flops_per_token, write_random_adapter
from loom.bench.throughput import run_throughput
from loom.config import EngineConfig, LoraServingConfig


def test_a_random_adapter_is_one_peft_loads_and_loom_serves_alike(tiny_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = LLM(tiny_folder, weights="fp32", lora_serving=LoraServingConfig(max_lora_rank=8))
    folder = write_random_adapter(llm.config, str(tmp_path / "a"), rank=8, seed=1, std=0.1)
    llm.add_lora("a", folder)
    pool, ids = llm.engine.adapters, torch.tensor([5, 9, 77, 3, 120, 4])
    slot = pool.acquire(pool.get("a"))
    with pool.hooks.using(torch.full((len(ids),), slot)), torch.no_grad():
        served = llm.model.logits(ids)
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(hf, folder).eval()(ids[None]).logits[0]
        base = llm.model.logits(ids)
    torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-4)
    assert (served - base).abs().max() > 1e-3
    c = llm.config
    assert adapter_flops_per_token(c, 8) == c.num_layers * 2 * 8 * (
        (c.q_size + c.hidden_size) + 2 * (c.kv_size + c.hidden_size) + (c.hidden_size + c.q_size)
        + 3 * (c.intermediate_size + c.hidden_size))


@pytest.fixture(scope="module")
def result(tiny_folder):
    return run_throughput(EngineConfig(model=tiny_folder, weights="fp32"), num_prompts=6, input_len=12,
                          output_len=5, peers=("peft",), hf_batch=(2, 6), hf_dtype=("float32",), repeats=1, loras=3,
                          lora_rank=4)


def test_the_mixed_adapter_run_sits_beside_the_base_run(result):
    lora = result["results"]["loom_lora"]
    assert lora["adapters"] == 3 and lora["rank"] == 4
    for run in (lora["base"], lora["mixed"]):
        assert run["output_len_mismatches"] == 0 and run["output_tokens"] == 6 * 5
    assert lora["mixed_over_base"] == pytest.approx(lora["mixed"]["total_tokens_per_s"]
                                                    / lora["base"]["total_tokens_per_s"])
    b1 = lora["batch1"]
    assert b1["adapter_over_base"] == pytest.approx(b1["adapter_decode_tokens_per_s"] / b1["base_decode_tokens_per_s"])
    assert len(b1["runs"]["base"]) == len(b1["runs"]["adapter"]) == 5
    assert 0 < b1["adapter_over_base_median"]
    assert 0 < lora["adapter_flops_fraction"] < 1


def test_the_peft_peer_sweeps_its_batches_and_is_compared_at_its_best(result):
    configs = result["results"]["loom_lora"]["peft_configs"]
    assert [(c["batch"], c["dtype"]) for c in configs] == [(2, "float32"), (6, "float32")]
    assert all("error" not in c and c["output_tokens"] == 6 * 5 for c in configs)
    lora = result["results"]["loom_lora"]
    assert lora["peft"]["total_tokens_per_s"] == max(c["total_tokens_per_s"] for c in configs)
    assert lora["mixed_over_peft"] == pytest.approx(lora["mixed"]["total_tokens_per_s"]
                                                    / lora["peft"]["total_tokens_per_s"])
    assert result["hf_configs"] == []  # the base-model HF peer was not asked for


def test_adapters_on_some_projections_only(tiny_folder, tmp_path):
    from loom.bench.lora import write_random_adapters

    llm = LLM(tiny_folder, weights="fp32", lora_serving=LoraServingConfig(max_lora_rank=4))
    (name, folder), = write_random_adapters(llm.config, str(tmp_path), 1, 4, targets=("q_proj", "v_proj"))
    assert llm.engine.add_lora(name, folder).linears == (True, False, False, False)
    c = llm.config
    assert adapter_flops_per_token(c, 4, ("q_proj", "v_proj")) == c.num_layers * 2 * 4 * (
        c.q_size + c.kv_size + 2 * c.hidden_size)


def test_bad_lora_options_are_refused(tiny_folder):
    with pytest.raises(ValueError, match="--lora-rank"):
        run_throughput(EngineConfig(model=tiny_folder), num_prompts=2, input_len=4, output_len=2, peers=(),
                       loras=2, lora_rank=0)
    with pytest.raises(ValueError, match="--lora-targets takes"):
        run_throughput(EngineConfig(model=tiny_folder), num_prompts=2, input_len=4, output_len=2, peers=(),
                       loras=1, lora_targets=["lm_head"])
    with pytest.raises(ValueError, match="give --loras"):
        run_throughput(EngineConfig(model=tiny_folder), num_prompts=2, input_len=4, output_len=2, peers=("peft",))


def test_the_plot_is_written(result, tmp_path):
    from loom.bench.lora import plot_lora

    path = tmp_path / "lora.png"
    plot_lora(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
