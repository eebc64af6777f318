"""Prompt tuning (soft prompts) against PEFT + transformers on tiny random Llamas: a PEFT-made adapter gives
PEFT's logits and loss in loom, every initialization starts where PEFT's does, ten AdamW steps give the same
losses and embeddings, loom's saved adapter loads in PEFT, and malformed adapters are refused naming the
file and tensor."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.finetune.prompt_tuning import (PromptTuningConfig, attach_prompt_tuning, load_prompt_tuning,
                                         prompt_lm_loss)
from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from tests.helpers import save_tiny_hf

N = 5
WORDS = "classify the sentiment of this review as positive or negative".split()


def peft_prompt(base, seed: int = 0, n: int = N, **options):
    """PEFT's prompt tuning on ``base``, its embedding drawn after ``torch.manual_seed(seed)``."""
    from peft import PromptTuningConfig as PeftConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, **options))


def peft_embeddings(peft) -> torch.Tensor:
    return peft.prompt_encoder["default"].embedding.weight.detach()


def save_tokenizer(folder) -> None:
    """A word-level tokenizer that adds a BOS (as Llama's does), in HF's files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "unk_token": "<unk>"}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    save_tiny_hf(str(folder), num_key_value_heads=2)
    save_tokenizer(folder)
    return folder


def hf_model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def loom_model(base):
    return load_model(str(base), weights="fp32").model


def test_a_peft_adapter_gives_pefts_logits_loss_and_greedy_tokens(base, tmp_path):
    peft = peft_prompt(hf_model(base), seed=1).eval()
    peft.save_pretrained(str(tmp_path / "adapter"))
    soft = load_prompt_tuning(tmp_path / "adapter", loom_model(base))
    assert torch.equal(soft.prompt.weight, peft_embeddings(peft))
    seqs = [torch.tensor([3, 17, 42, 7, 99, 5, 64, 12]), torch.tensor([8, 9, 200, 31, 2])]
    labels = [s.clone() for s in seqs]
    labels[0][:3] = -100  # a prompt not trained on
    with torch.no_grad():
        ours = soft.logits(seqs)  # one flat batch, virtual rows included
        rows = 0
        for s in seqs:  # PEFT returns logits for the N virtual positions too
            theirs = peft(input_ids=s[None]).logits[0]
            torch.testing.assert_close(ours[rows:rows + N + len(s)], theirs, rtol=1e-5, atol=1e-5)
            rows += N + len(s)
        theirs_loss = peft(input_ids=seqs[0][None], labels=labels[0][None]).loss
        torch.testing.assert_close(soft.loss(soft.model, seqs[:1], labels[:1]), theirs_loss, rtol=1e-5, atol=1e-6)
        # greedy decoding with loom's KV cache equals greedy over PEFT's full forward (PEFT 0.21's generate
        # re-injects the prompt at every step under transformers 5, so it is no reference here)
        ids = seqs[0].tolist()
        for _ in range(6):
            ids.append(int(peft(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert soft.generate_greedy(seqs[0].tolist(), 6) == ids[len(seqs[0]):]
        with peft.disable_adapter():
            assert (peft(input_ids=seqs[0][None]).logits[0] - ours[N:N + 8]).abs().max() > 1e-2  # it matters


def test_inputs_embeds_of_the_tokens_are_the_tokens(base):
    model = loom_model(base)
    ids = torch.tensor([3, 17, 42, 7])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(None, inputs_embeds=model.embed_tokens(ids)), model.logits(ids),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("init", ["random", "sample_vocab"])
def test_random_inits_draw_what_peft_draws(base, init):
    peft = peft_prompt(hf_model(base), seed=7, prompt_tuning_init=init.upper())
    soft = attach_prompt_tuning(loom_model(base), PromptTuningConfig(N, init, seed=7))
    torch.testing.assert_close(soft.prompt.weight.detach(), peft_embeddings(peft), rtol=0, atol=0)


@pytest.mark.parametrize("n", [3, 12])  # the text cut, and repeated
def test_text_init_equals_pefts_and_saves_as_peft_reads_it(base, tmp_path, n):
    from peft import PeftModel

    from loom.tokenizer import load_tokenizer

    text = "classify the sentiment of this review"
    peft = peft_prompt(hf_model(base), n=n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                       tokenizer_name_or_path=str(base))
    config = PromptTuningConfig(n, "text", text)
    soft = attach_prompt_tuning(loom_model(base), config, load_tokenizer(str(base)))
    torch.testing.assert_close(soft.prompt.weight.detach(), peft_embeddings(peft), rtol=0, atol=0)
    soft.save(tmp_path / "adapter", base_model=str(base))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["prompt_tuning_init"], saved["prompt_tuning_init_text"], saved["tokenizer_name_or_path"]) == \
        ("TEXT", text, str(base))
    loaded = PeftModel.from_pretrained(hf_model(base), str(tmp_path / "adapter"))
    assert torch.equal(peft_embeddings(loaded), soft.prompt.weight.detach())
    assert load_prompt_tuning(tmp_path / "adapter", soft.model).config == config


def batches(steps: int, batch: int = 2, length: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    texts = torch.randint(0, 200, (4, length), generator=gen)
    out = []
    for _ in range(steps):
        ids = texts[torch.randint(0, 4, (batch,), generator=gen)]
        labels = ids.clone()
        labels[:, :2] = -100
        out.append((ids, labels))
    return out


def adamw_steps(parameters, loss_of, data) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=0.05, weight_decay=0.01)
    losses = []
    for ids, labels in data:
        loss = loss_of(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_ten_steps_equal_peft_and_the_saved_prompt_loads_in_peft(base, tmp_path):
    from peft import PeftModel

    data = batches(10)
    peft = peft_prompt(hf_model(base), seed=3)
    peft.train()
    theirs = adamw_steps([p for p in peft.parameters() if p.requires_grad],
                         lambda ids, labels: peft(input_ids=ids, labels=labels).loss, data)
    model = loom_model(base)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    soft = attach_prompt_tuning(model, PromptTuningConfig(N, seed=3))
    ours = adamw_steps(soft.parameters(), lambda ids, labels: prompt_lm_loss(model, soft.prompt, ids, labels), data)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)
    assert ours[-1] < ours[0]  # it learns
    torch.testing.assert_close(soft.prompt.weight.detach(), peft_embeddings(peft), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # only the prompt trained

    soft.save(tmp_path / "adapter", base_model=str(base))
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == {"prompt_embeddings"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(hf_model(base), str(tmp_path / "adapter")).eval()
        ids = data[0][0][:1]
        with torch.no_grad():
            torch.testing.assert_close(soft.logits(ids), loaded(input_ids=ids).logits[0], rtol=1e-5, atol=1e-5)


def broken(base, tmp_path, change) -> str:
    """A PEFT-made adapter with ``change(config, tensors)`` applied."""
    peft_prompt(hf_model(base)).save_pretrained(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    change(config, tensors)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    return str(tmp_path / "adapter")


@pytest.mark.parametrize("change,file,words", [
    (lambda c, t: c.update(token_dim=32), "adapter_config.json", "token_dim 32 but the base model's hidden size is 64"),
    (lambda c, t: t.update(prompt_embeddings=torch.zeros(N, 32)), "adapter_model.safetensors",
     "(tensor 'prompt_embeddings'): torch.float32 (5, 32), but the config says 5 virtual tokens of token_dim 64"),
    (lambda c, t: c.update(num_virtual_tokens=4), "adapter_model.safetensors", "(tensor 'prompt_embeddings')"),
    (lambda c, t: t.update(other=t.pop("prompt_embeddings")), "adapter_model.safetensors",
     "(tensor 'prompt_embeddings'): no prompt_embeddings tensor"),
    (lambda c, t: t.update(extra=torch.zeros(2)), "adapter_model.safetensors", "(tensor 'extra')"),
    (lambda c, t: c.update(task_type="SEQ_2_SEQ_LM", num_transformer_submodules=2), "adapter_config.json",
     "decoder-only"),
    (lambda c, t: c.update(peft_type="LORA"), "adapter_config.json", "a LoRA adapter loads with lora="),
    (lambda c, t: c.update(prompt_tuning_init="TEXT"), "adapter_config.json", "needs init_text"),
])
def test_malformed_adapters_name_the_file_and_tensor(base, tmp_path, change, file, words):
    folder = broken(base, tmp_path, change)
    with pytest.raises(WeightsError) as e:
        load_prompt_tuning(folder, loom_model(base))
    assert f"{folder}/{file}" in str(e.value) and words in str(e.value)


def test_lora_loading_says_what_a_prompt_tuning_folder_is(base, tmp_path):
    peft_prompt(hf_model(base)).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(WeightsError, match="PROMPT_TUNING is a soft prompt.*load_prompt_tuning"):
        load_model(str(base), weights="fp32", lora=str(tmp_path / "adapter"))
