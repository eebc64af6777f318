"""RoPE scaling: read from GGUF metadata and HF configs, overridden from the API and the CLI, and checked
end to end against transformers run with the same scaling, at positions past the trained context."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loom.config import ModelConfig, RopeScaling, parse_rope_scaling, with_rope_scaling
from loom.weights.errors import WeightsError
from loom.weights.gguf import GGUFFile, config_from_gguf
from loom.weights.hf import config_from_hf
from loom.weights.loader import load_model
from tests.helpers import byte_level_vocab_meta, hf_logits, save_tiny_hf, write_llama_gguf

TRAINED = 32  # the tiny models' context: every test runs past it
IDS = [(7 * i + 3) % 95 + 32 for i in range(100)]  # 100 printable ASCII bytes = byte-level token ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An unscaled tiny llama (context 32) saved as an HF folder, and the folder."""
    folder = tmp_path_factory.mktemp("tiny-rope")
    model = save_tiny_hf(str(folder), "llama", num_key_value_heads=2, max_position_embeddings=TRAINED,
                         initializer_range=0.1)  # sharper attention: positions matter more
    return model, str(folder)


def hf_scaled(model, params: dict | None):
    """The same weights in transformers with ``rope_parameters`` (None: plain RoPE): the reference."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(params or {})}
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def write_gguf(path: str, model, **rope_meta) -> str:
    meta = dict(byte_level_vocab_meta())
    meta.update({f"add_rope_scaling_{k}": v for k, v in rope_meta.items()})
    write_llama_gguf(path, model, "F32", tokenizer_meta=meta)
    return path


# Reading ---------------------------------------------------------------------------------------------

def test_gguf_metadata_keys_are_read(tmp_path, tiny):
    from gguf import RopeScalingType

    path = write_gguf(str(tmp_path / "yarn.gguf"), tiny[0], type=RopeScalingType.YARN, factor=4.0,
                      orig_ctx_len=TRAINED, yarn_beta_fast=16.0, yarn_beta_slow=2.0)
    g = GGUFFile(path)
    config = config_from_gguf(g)
    g.close()
    assert config.rope_scaling == RopeScaling("yarn", 4.0, TRAINED, beta_fast=16.0, beta_slow=2.0)
    assert config.max_position_embeddings == 4 * TRAINED  # the context grows with the factor


@pytest.mark.parametrize("kind,factor", [("none", 4.0), ("linear", 1.0)])
def test_gguf_no_scaling(tmp_path, tiny, kind, factor):
    from gguf import RopeScalingType

    path = write_gguf(str(tmp_path / "none.gguf"), tiny[0], type=RopeScalingType(kind), factor=factor)
    g = GGUFFile(path)
    config = config_from_gguf(g)
    g.close()
    assert config.rope_scaling is None and config.max_position_embeddings == TRAINED


def test_gguf_unsupported_scaling_is_an_error(tmp_path, tiny):
    from gguf import RopeScalingType

    path = write_gguf(str(tmp_path / "longrope.gguf"), tiny[0], type=RopeScalingType.LONGROPE, factor=4.0)
    with pytest.raises(WeightsError, match="longrope"):
        load_model(path)


def hf_config(**extra) -> dict:
    return {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 4096, **extra}


@pytest.mark.parametrize("extra,want,context", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, RopeScaling("linear", 2.0, 4096), 8192),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, RopeScaling("linear", 4.0, 4096), 16384),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                       "beta_fast": 8, "beta_slow": 2, "attention_factor": 1.5, "truncate": False}},
     RopeScaling("yarn", 4.0, 1024, 8.0, 2.0, 1.5, False), 4096),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}},
     RopeScaling("yarn", 4.0, 4096), 16384),  # Qwen2.5's spelling: both contexts 4096, meaning 4 x 4096
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "original_max_position_embeddings": 1024}},
     RopeScaling("yarn", 4.0, 1024), 4096),  # no factor: max_position / original, as transformers does
    ({"rope_scaling": {"rope_type": "default"}}, None, 4096),
], ids=["type", "rope_type", "yarn-params", "yarn-qwen", "rope_parameters-no-factor", "default"])
def test_hf_config_rope_scaling_is_read(extra, want, context):
    config = config_from_hf(hf_config(**extra))
    assert config.rope_scaling == want and config.max_position_embeddings == context
    if "rope_parameters" in extra:
        assert config.rope_theta == 5e5


@pytest.mark.parametrize("scaling,msg", [({"type": "dynamic", "factor": 2.0}, "dynamic"),
                                         ({"type": "linear"}, "needs a factor"),
                                         ({"type": "linear", "factor": 0.0}, "positive"),
                                         ({"type": "yarn", "factor": 4.0, "mscale": 0.7}, "mscale")])
def test_hf_config_bad_scaling(scaling, msg):
    with pytest.raises(WeightsError, match=msg):
        config_from_hf(hf_config(rope_scaling=scaling))


# End to end against transformers ----------------------------------------------------------------------

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED, "beta_fast": 8.0}


@pytest.mark.parametrize("params", [{"rope_type": "linear", "factor": 4.0}, YARN], ids=["linear", "yarn"])
def test_scaled_gguf_matches_transformers_past_the_trained_context(tmp_path, tiny, params):
    from gguf import RopeScalingType

    path = write_gguf(str(tmp_path / "scaled.gguf"), tiny[0], type=RopeScalingType(params["rope_type"]), factor=4.0,
                      orig_ctx_len=TRAINED, **({"yarn_beta_fast": 8.0} if params["rope_type"] == "yarn" else {}))
    got = load_model(path).model.logits(torch.tensor(IDS))
    want = hf_logits(hf_scaled(tiny[0], params), IDS)
    assert (got - want).abs().max() < 1e-4
    # The scaling matters at these positions: 20x the tolerance above.
    assert (got - hf_logits(tiny[0], IDS)).abs().max() > 2e-3


@pytest.mark.parametrize("scaling,params", [
    (RopeScaling("linear", 4.0), {"rope_type": "linear", "factor": 4.0}),
    (RopeScaling("yarn", 4.0, beta_fast=8.0), YARN),
    (RopeScaling("ntk", 4.0), None),  # no transformers type: checked against base' = base * s^(d / (d - 2))
], ids=["linear", "yarn", "ntk"])
def test_override_reaches_the_model(tiny, scaling, params):
    model, folder = tiny
    loaded = load_model(folder, rope_scaling=scaling)
    assert loaded.config.max_position_embeddings == 4 * TRAINED
    assert loaded.config.rope_scaling.original_max_position == TRAINED
    got = loaded.model.logits(torch.tensor(IDS))
    if params is None:
        params = {"rope_theta": 10000.0 * 4.0 ** (16 / 14)}
    assert (got - hf_logits(hf_scaled(model, params), IDS)).abs().max() < 1e-4
    assert (got - hf_logits(model, IDS)).abs().max() > 2e-3


def test_none_switches_off_the_files_scaling(tmp_path, tiny):
    from gguf import RopeScalingType

    path = write_gguf(str(tmp_path / "linear.gguf"), tiny[0], type=RopeScalingType.LINEAR, factor=4.0)
    loaded = load_model(path, rope_scaling="none")
    assert loaded.config.rope_scaling is None and loaded.config.max_position_embeddings == TRAINED
    assert (loaded.model.logits(torch.tensor(IDS)) - hf_logits(tiny[0], IDS)).abs().max() < 1e-4


def test_override_replaces_the_files_scaling_from_its_original_context(tmp_path, tiny):
    from gguf import RopeScalingType

    path = write_gguf(str(tmp_path / "linear.gguf"), tiny[0], type=RopeScalingType.LINEAR, factor=4.0)
    loaded = load_model(path, rope_scaling=RopeScaling("linear", 2.0))
    assert loaded.config.rope_scaling == RopeScaling("linear", 2.0, TRAINED)
    assert loaded.config.max_position_embeddings == 2 * TRAINED


# The CLI and the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny):
    return write_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"), tiny[0])


def test_cli_eval_ppl_with_scaling_equals_transformers(tmp_path, capsys, tiny, tiny_gguf):
    """`loom eval ppl --rope-scaling yarn --rope-factor 4` scores a 100-token window of a model trained on 32:
    the perplexity equals transformers' with the same YaRN scaling."""
    from loom.cli import main

    text = tmp_path / "text.txt"
    text.write_bytes(bytes(IDS))  # the byte-level tokenizer maps byte b to token b
    argv = ["eval", "ppl", "--model", tiny_gguf, "--corpus", str(text), "--window", "100", "--json", "--no-progress"]
    assert main(argv) == 2 and "exceeds the model's context of 32" in capsys.readouterr().err
    assert main(argv + ["--rope-scaling", "yarn", "--rope-factor", "4", "--weights", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["context"] == 4 * TRAINED and result["rope_scaling"]["kind"] == "yarn"
    logits = hf_logits(hf_scaled(tiny[0], {**YARN, "beta_fast": 32.0}), IDS)
    nll = -torch.log_softmax(logits[:-1].double(), -1).gather(-1, torch.tensor(IDS[1:])[:, None]).sum()
    assert result["perplexity"] == pytest.approx(float(torch.exp(nll / 99)), rel=1e-4)


def test_engine_accepts_prompts_up_to_the_scaled_context(tiny_gguf):
    from loom import LLM, SamplingParams

    plain = LLM(tiny_gguf, weights="fp32")
    assert plain.engine.max_model_len == TRAINED
    with pytest.raises(ValueError):
        plain.generate([IDS], SamplingParams(max_tokens=1))
    llm = LLM(tiny_gguf, weights="fp32", rope_scaling=RopeScaling("yarn", 4.0))
    assert llm.engine.max_model_len == 4 * TRAINED
    out = llm.generate([IDS], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))[0]
    assert len(out.outputs[0].token_ids) == 2
    # The engine's prompt scores (paged KV, chunked prefill) equal the scaled model's plain forward.
    logprobs = torch.log_softmax(llm.model.logits(torch.tensor(IDS)).double(), -1)
    want = [float(logprobs[t - 1, IDS[t]]) for t in range(1, len(IDS))]
    got = [entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], IDS[1:])]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("argv,msg", [
    (["--rope-scaling", "linear", "--rope-factor", "0"], "factor must be a positive"),
    (["--rope-scaling", "yarn", "--rope-factor", "-2"], "factor must be a positive"),
    (["--rope-scaling", "yarn"], "needs --rope-factor"),
    (["--rope-factor", "2"], "need --rope-scaling"),
])
def test_cli_errors(capsys, tiny_gguf, argv, msg):
    from loom.cli import main

    assert main(["generate", "x", "--model", tiny_gguf, "--max-tokens", "1", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_cli_unknown_kind_is_refused(capsys):
    from loom.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--rope-scaling", "dynamic", "--rope-factor", "2"])
    assert e.value.code == 2 and "invalid choice: 'dynamic'" in capsys.readouterr().err


def test_api_errors():
    with pytest.raises(ValueError, match="unknown RoPE scaling 'dynamic'"):
        RopeScaling("dynamic", 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        RopeScaling("linear", float("nan"))
    alibi = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, position="alibi")
    with pytest.raises(ValueError, match="needs a RoPE model"):
        with_rope_scaling(alibi, RopeScaling("linear", 2.0))
    with pytest.raises(ValueError, match="RoPE positions"):
        ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, position="alibi",
                    rope_scaling=RopeScaling("linear", 2.0))
    assert with_rope_scaling(alibi, "none") is alibi and parse_rope_scaling(None) is None
