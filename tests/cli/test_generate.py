"""`loom generate` in-process on the default model: JSON, streaming, engine, speculative and KV options."""

from __future__ import annotations

import json

from tests.cli.helpers import run


def test_generate_json(capsys):
    code, out, _ = run(capsys, "generate", "The capital of France is", "--temperature", "0", "--max-tokens", "6",
                       "--json")
    assert code == 0
    result = json.loads(out)
    assert result["prompt_token_ids"] == [504, 3575, 282, 4649, 314]
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == "length"
    assert result["text"].startswith(" Paris")
    assert {"prefill_s", "decode_tokens_per_s", "load_s"} <= set(result["timings"])


def test_generate_streams_chat_and_prints_speed(capsys):
    code, out, err = run(capsys, "generate", "What is the capital of France?", "--chat", "--temperature", "0",
                         "--max-tokens", "20")
    assert code == 0 and "Paris" in out and "tok/s" in err


def test_engine_options_and_cache_report(capsys):
    code, out, err = run(capsys, "generate", "Hi", "--temperature", "0", "--max-tokens", "3", "--kv-cache-memory",
                         "32MiB", "--block-size", "8", "--no-prefix-caching", "--max-num-seqs", "4")
    assert code == 0 and "KV cache:" in err and "blocks of 8 tokens" in err
    code, _, err = run(capsys, "generate", "Hi", "--kv-cache-memory", "lots")
    assert code == 2 and "cannot read a size" in err


def test_generate_with_speculative_decoding_equals_plain(capsys):
    argv = ["generate", "Repeat: the quick brown fox jumps over the lazy dog. Repeat: the quick brown fox",
            "--temperature", "0", "--max-tokens", "12", "--json"]
    code, out, _ = run(capsys, *argv)
    plain = json.loads(out)["token_ids"]
    for extra in (["--speculative", "ngram"], ["--speculative", "window", "--spec-window", "8"]):
        code, out, _ = run(capsys, *argv, *extra, "--num-speculative-tokens", "3")
        assert code == 0 and json.loads(out)["token_ids"] == plain


def test_kv_policy_options(capsys):
    code, out, _ = run(capsys, "generate", "The history of England", "--temperature", "0", "--max-tokens", "40",
                       "--kv-policy", "streaming", "--kv-budget", "24", "--kv-prefill-chunk", "8", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 40
    code, _, err = run(capsys, "generate", "Hi", "--kv-policy", "h2o")
    assert code == 2 and "budget" in err



def test_generate_with_a_lora_adapter(capsys, smollm_path, smollm_hf_dir, tmp_path):
    """--lora merges a PEFT adapter (made here by PEFT on the HF copy of the model) as LLM(lora=) does."""
    import torch
    from transformers import AutoModelForCausalLM

    from loom import LLM, SamplingParams
    from tests.weights.test_lora import peft_adapter

    hf = AutoModelForCausalLM.from_pretrained(smollm_hf_dir, dtype=torch.float32).eval()
    peft_adapter(hf, tmp_path / "adapter", seed=4, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    prompt = "The capital of France is"
    code, out, err = run(capsys, "generate", prompt, "--max-tokens", "6", "--temperature", "0",
                         "--lora", str(tmp_path / "adapter"), "--model", smollm_path)
    assert code == 0, err
    adapted = LLM(smollm_path, lora=str(tmp_path / "adapter"))
    text = adapted.generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    plain = LLM(smollm_path, weights="fp32").generate(prompt, SamplingParams(temperature=0, max_tokens=6))
    assert text.strip() and text.strip() in out and text != plain[0].outputs[0].text


def test_merge_writes_a_folder_that_generates_as_the_adapter_does(capsys, smollm_path, smollm_hf_dir, tmp_path):
    """`loom merge` of the real GGUF and a PEFT adapter: the merged folder (tokenizer included) generates
    what the base with --lora generates."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.weights.test_lora import peft_adapter

    hf = AutoModelForCausalLM.from_pretrained(smollm_hf_dir, dtype=torch.float32).eval()
    peft_adapter(hf, tmp_path / "adapter", seed=6, r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"])
    code, _, err = run(capsys, "merge", "--model", smollm_path, "--lora", str(tmp_path / "adapter"),
                       "--out", str(tmp_path / "merged"))
    assert code == 0, err
    options = ["--max-tokens", "8", "--temperature", "0"]
    code, merged, err = run(capsys, "generate", "Once upon a time", "--model", str(tmp_path / "merged"), *options)
    assert code == 0, err
    code, adapted, err = run(capsys, "generate", "Once upon a time", "--model", smollm_path,
                             "--lora", str(tmp_path / "adapter"), *options)
    assert code == 0 and merged == adapted, err


def test_finetune_trains_an_adapter_that_generate_takes(capsys, smollm_path, tmp_path):
    """`loom finetune` on a small text: the loss falls, the held-out perplexity is reported, the adapter
    (PEFT's files, a loss curve) is written, and `loom generate --lora` runs it."""
    text = tmp_path / "train.txt"
    text.write_text("To be, or not to be, that is the question. " * 60)
    code, out, err = run(capsys, "finetune", "--data", str(text), "--out", str(tmp_path / "adapter"), "--steps", "4",
                         "--seq-len", "32", "--batch-size", "2", "--lr", "2e-3", "--r", "4", "--json",
                         "--target-modules", "q_proj,v_proj")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["losses"][-1] < summary["losses"][0]
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.png", "finetune.json"} <= \
        {p.name for p in (tmp_path / "adapter").iterdir()}
    code, out, err = run(capsys, "generate", "To be, or not", "--max-tokens", "4", "--temperature", "0",
                         "--lora", str(tmp_path / "adapter"), "--model", smollm_path)
    assert code == 0 and out.strip(), err


def test_finetune_a_soft_prompt(capsys, smollm_path, tmp_path):
    """`loom finetune --method prompt-tuning`: a soft prompt trains (loss and held-out perplexity fall) and
    is written in PEFT's prompt-tuning format."""
    text = tmp_path / "train.txt"
    text.write_text("To be, or not to be, that is the question. " * 60)
    code, out, err = run(capsys, "finetune", "--data", str(text), "--out", str(tmp_path / "soft"), "--steps", "4",
                         "--seq-len", "32", "--batch-size", "2", "--method", "prompt-tuning",
                         "--num-virtual-tokens", "4", "--prompt-init", "text", "--prompt-init-text", "Hamlet says",
                         "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "prompt-tuning" and summary["trainable_parameters"] == 4 * 576
    assert summary["losses"][-1] < summary["losses"][0]
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"]
    config = json.loads((tmp_path / "soft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4


def test_generate_under_a_memory_budget_equals_plain(capsys):
    """The default model with most decoder layers streamed from its GGUF: the same greedy tokens."""
    argv = ["generate", "The capital of France is", "--temperature", "0", "--max-tokens", "5", "--json",
            "--kv-cache-memory", "8MiB"]
    code, out, _ = run(capsys, *argv, "--decode-step", "module")
    plain = json.loads(out)["token_ids"]
    code, out, err = run(capsys, *argv, "--memory-budget", "60M")  # the minimum is ~56 MB: nearly all streamed
    assert code == 0 and json.loads(out)["token_ids"] == plain
    code, _, err = run(capsys, *argv, "--memory-budget", "40M")
    assert code != 0 and "smallest workable set" in err and "--memory-budget" in err
