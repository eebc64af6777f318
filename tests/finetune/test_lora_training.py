"""LoRA training against PEFT + transformers from the same initialization: the same loss at every one of 20
AdamW steps (warmup + cosine, clipping, accumulation), the same adapter weights after, and the adapter loom
saves loads in PEFT (and in loom's --lora) with the same logits."""

from __future__ import annotations

import torch

from loom.finetune import LoraConfig, TrainConfig, attach_lora, lm_loss, train
from loom.weights.loader import load_model
from tests.helpers import save_tiny_hf

STEPS = 20


def batches(seed: int = 0, n: int = 2 * STEPS, batch: int = 2, length: int = 16):
    """Windows drawn from 4 fixed random sequences (something to learn)."""
    gen = torch.Generator().manual_seed(seed)
    texts = torch.randint(0, 128, (4, length), generator=gen)
    return [(texts[torch.randint(0, 4, (batch,), generator=gen)], None) for _ in range(n)]


def test_twenty_steps_equal_peft(tmp_path):
    from peft import LoraConfig as PeftConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    hf = save_tiny_hf(str(tmp_path / "base"))
    peft = get_peft_model(hf, PeftConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    model = load_model(str(tmp_path / "base"), weights="fp32").model
    lora = attach_lora(model, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():  # PEFT's initialization (A Kaiming-uniform, B zero) copied into loom's pairs
        state = lora.peft_state_dict()
        peft_params = dict(peft.named_parameters())
        for key in state:
            peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                      ".lora_B.default.weight")
            module, part = _module_of(lora, key)
            getattr(module, "lora_A" if ".lora_A." in key else "lora_B")[part].copy_(peft_params[peft_key])
    config = TrainConfig(lr=3e-3, weight_decay=0.01, warmup_steps=3, max_steps=STEPS, grad_accum=2, max_grad_norm=0.5)
    data = batches()
    ours = [log.loss for log in train(model, lora.parameters(), data, config)]

    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, 3, STEPS)
    theirs, it = [], iter(data)
    peft.train()
    for _ in range(STEPS):
        total = 0.0
        for _ in range(2):
            ids, _ = next(it)
            loss = peft(input_ids=ids, labels=ids).loss / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        theirs.append(total)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)
    assert ours[-1] < ours[0]  # it learns
    peft_params = dict(peft.named_parameters())
    for key, value in lora.peft_state_dict().items():
        peft_key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        torch.testing.assert_close(value, peft_params[peft_key].detach(), rtol=1e-4, atol=1e-4)

    # the saved adapter: PEFT loads it, loom merges it, both give the trained model's logits
    lora.save(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    ids = data[0][0][:1]
    with torch.no_grad():
        trained = model.logits(ids[0])
        merged = load_model(str(tmp_path / "base"), weights="fp32", lora=str(tmp_path / "adapter")).model.logits(ids[0])
        theirs_logits = loaded(input_ids=ids).logits[0]
    torch.testing.assert_close(trained, theirs_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, theirs_logits, rtol=1e-5, atol=1e-5)


def _module_of(lora, key: str):
    """The LoraLinear and part name behind a PEFT key."""
    layer = key.split(".layers.")[1].split(".")[0]
    part = key.split(".")[-3]
    for name, module in lora.modules.items():
        if name.startswith(f"layers.{layer}.") and part in module.lora_A:
            return module, part
    raise KeyError(key)


def test_the_loss_is_hfs(tmp_path):
    hf = save_tiny_hf(str(tmp_path / "base"))
    model = load_model(str(tmp_path / "base"), weights="fp32").model
    ids = batches(n=1, batch=3)[0][0]
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt not trained on
    with torch.no_grad():
        for lab in (None, labels):
            expected = hf(input_ids=ids, labels=ids if lab is None else lab).loss
            torch.testing.assert_close(lm_loss(model, ids, lab), expected, rtol=1e-5, atol=1e-6)


def test_only_the_adapter_trains(tmp_path):
    save_tiny_hf(str(tmp_path / "base"))
    model = load_model(str(tmp_path / "base"), weights="fp32").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = attach_lora(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    train(model, lora.parameters(), batches(), TrainConfig(lr=1e-2, max_steps=3))
    after = model.state_dict()
    for k, v in before.items():  # an adapted linear's weight is now its LoraLinear's base.weight
        moved = k if k in after else ".base.".join(k.rsplit(".", 1))
        assert torch.equal(v, after[moved]), k
    assert {k.split(".")[-3] for k in lora.peft_state_dict()} == {"q_proj", "down_proj"}


def test_qlora_trains_on_an_nf4_base(tmp_path):
    """QLoRA: the decoder linears in NF4 (forward and backward dequantize), adapters on top: the base's
    logits are the dequantized model's, the loss falls, and only the adapters change."""
    from loom.finetune.lora import quantize_base_nf4

    save_tiny_hf(str(tmp_path / "base"))
    model = load_model(str(tmp_path / "base"), weights="fp32").model
    dense = load_model(str(tmp_path / "base"), weights="fp32").model
    nbytes = quantize_base_nf4(model)
    ids = batches(n=1)[0][0][0]
    with torch.no_grad():  # the NF4 model is the dense one with its linears' weights rounded to NF4
        for name, module in model.named_modules():
            if hasattr(module, "weight_nf4"):
                dense.get_submodule(name).weight.copy_(module.dequantized_weight())
        torch.testing.assert_close(model.logits(ids), dense.logits(ids), rtol=1e-5, atol=1e-5)
    dense_bytes = sum(m.weight.numel() * 4 for n, m in dense.named_modules()
                      if n.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")))
    assert nbytes < dense_bytes / 7  # ~4.1 of 32 bits
    lora = attach_lora(model, LoraConfig(r=4, lora_alpha=8))
    logs = train(model, lora.parameters(), batches(), TrainConfig(lr=3e-3, max_steps=12))
    assert logs[-1].loss < logs[0].loss


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    """The same losses and adapter weights with the layers' activations recomputed in the backward."""
    save_tiny_hf(str(tmp_path / "base"))
    results = []
    for on in (False, True):
        model = load_model(str(tmp_path / "base"), weights="fp32").model
        lora = attach_lora(model, LoraConfig(r=4, lora_alpha=8, seed=3))
        with torch.no_grad():  # B away from zero, so every gradient path is exercised from the start
            for p in lora.parameters():
                p.add_(0.01)
        logs = train(model, lora.parameters(), batches(), TrainConfig(lr=1e-3, max_steps=5,
                                                                      activation_checkpointing=on))
        results.append(([log.loss for log in logs], lora.peft_state_dict()))
        assert not any(type(layer).__name__ == "CheckpointedLayer" for layer in model.layers)  # unwrapped after
    torch.testing.assert_close(torch.tensor(results[0][0]), torch.tensor(results[1][0]), rtol=1e-6, atol=0)
    for key, value in results[0][1].items():
        torch.testing.assert_close(value, results[1][1][key], rtol=1e-6, atol=1e-7)


def test_load_peft_weights_sets_the_pairs_and_names_bad_tensors(tmp_path):
    """A PEFT-made adapter loaded unmerged into loom's trainable pairs gives PEFT's logits; a rank mismatch
    or a missing projection is an error naming the file and tensor."""
    import pytest
    from peft import LoraConfig as PeftConfig, get_peft_model

    from loom.weights.errors import WeightsError

    hf = save_tiny_hf(str(tmp_path / "base"))
    peft = get_peft_model(hf, PeftConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "adapter"))
    model = load_model(str(tmp_path / "base"), weights="fp32").model
    lora = attach_lora(model, LoraConfig(r=4, lora_alpha=8))
    lora.load_peft_weights(tmp_path / "adapter")
    ids = torch.arange(10)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), peft(input_ids=ids[None]).logits[0], rtol=1e-5, atol=1e-5)
    other = attach_lora(load_model(str(tmp_path / "base"), weights="fp32").model, LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(WeightsError, match=r"adapter_model.safetensors.*lora_A.weight is \(4, 64\)"):
        other.load_peft_weights(tmp_path / "adapter")
    fewer = get_peft_model(save_tiny_hf(str(tmp_path / "b2")), PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    fewer.save_pretrained(str(tmp_path / "fewer"))
    with pytest.raises(WeightsError, match="no tensor"):
        lora.load_peft_weights(tmp_path / "fewer")
