"""The BERT-style encoder against Hugging Face transformers' BertModel (tiny random models saved by
transformers itself), and the loader's refusals of malformed folders, each naming the file at fault."""

from __future__ import annotations

import json
import os

import pytest
import torch

from loom.models.encoder import Encoder, EncoderConfig
from loom.weights.encoder import is_encoder_folder, load_encoder, read_pooling
from loom.weights.errors import WeightsError

TINY_BERT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, type_vocab_size=2)


def save_tiny_bert(folder: str, seed: int = 0, task: bool = False, **overrides):
    """A random transformers BertModel (or BertForMaskedLM with ``task``) saved to ``folder``; returns the
    BertModel (fp32, eval). Norm weights and biases are randomized so that they matter."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(**(TINY_BERT | overrides))
    model = (transformers.BertForMaskedLM if task else transformers.BertModel)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model.bert if task else model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bert"))
    return folder, save_tiny_bert(folder)


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, seqs))
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


SEQS = [[2, 17, 33, 5, 90, 3], [2, 44, 3], [2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 3]]


def test_hidden_states_match_transformers_with_padding(tiny):
    folder, hf = tiny
    loaded = load_encoder(folder)
    assert loaded.config.num_layers == 2 and loaded.config.activation == "gelu"
    ids, mask = padded(SEQS)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = loaded.model(ids, mask)
    for i, s in enumerate(SEQS):  # padded positions are not compared: nothing reads them
        torch.testing.assert_close(got[i, :len(s)], want[i, :len(s)], rtol=0, atol=1e-5)


def test_token_types_match_transformers(tiny):
    folder, hf = tiny
    model = load_encoder(folder).model
    ids, mask = padded([SEQS[2]])
    types = torch.tensor([[0] * 5 + [1] * 6])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                               token_type_ids=types).last_hidden_state,
                                   rtol=0, atol=1e-5)


def test_a_sequence_is_the_same_alone_and_in_a_padded_batch(tiny):
    model = load_encoder(tiny[0]).model
    ids, mask = padded(SEQS)
    with torch.no_grad():
        batched = model(ids, mask)
        for i, s in enumerate(SEQS):
            alone = model(torch.tensor([s]))
            torch.testing.assert_close(batched[i, :len(s)], alone[0], rtol=0, atol=1e-6)


def test_task_checkpoints_and_pytorch_bin_load_the_same(tiny, tmp_path):
    folder, hf = tiny
    ids, mask = padded(SEQS)
    with torch.no_grad():
        reference = load_encoder(folder).model(ids, mask)
    # BertForMaskedLM saves its encoder under "bert."; the head's tensors are ignored
    task = str(tmp_path / "task")
    masked = save_tiny_bert(task, task=True)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(task).model(ids, mask),
                                   masked(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=1e-5)
    # pytorch_model.bin (read with weights_only) instead of safetensors
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    (binary / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with torch.no_grad():
        assert torch.equal(load_encoder(str(binary)).model(ids, mask), reference)


def test_random_init_and_parameter_count():
    config = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=16)
    model = Encoder(config).init_random()
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="exceed the model's 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


# Refusals -----------------------------------------------------------------------------------------


def copy_folder(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 3}, "num_hidden_layers is 3, but the file holds tensors for 2 layers"),
    ({"hidden_size": 48}, "does not match the config's"),
    ({"vocab_size": 1 << 30}, "does not match the config's"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key' is not supported"),
    ({"hidden_act": "swishy"}, "unsupported hidden_act"),
    ({"num_attention_heads": 5}, "not a multiple of num_attention_heads"),
    ({"is_decoder": True}, "BERT decoder"),
    ({"hidden_size": "64"}, "hidden_size is '64'; expected a positive integer"),
])
def test_malformed_configs_are_refused_naming_the_file(tiny, tmp_path, changes, message):
    folder = copy_folder(tiny[0], tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(WeightsError, match=message) as e:
        load_encoder(folder)
    assert folder in str(e.value)


def test_missing_and_corrupt_checkpoints_are_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(tiny[0], tmp_path / "missing")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(WeightsError, match="encoder.layer.1.output.dense.weight"):
        load_encoder(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(tiny[0], "config.json")).read())
    with pytest.raises(WeightsError, match="no model.safetensors or pytorch_model.bin"):
        load_encoder(str(empty))
    (empty / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="pytorch_model.bin: cannot read the PyTorch checkpoint"):
        load_encoder(str(empty))


def test_sentence_transformers_modules_are_read(tiny, tmp_path):
    folder = copy_folder(tiny[0], tmp_path / "st")
    assert read_pooling(folder, 64).mode == "mean" and not read_pooling(folder, 64).normalize  # no modules.json
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(folder, "1_Pooling"))
    pooling_path = os.path.join(folder, "1_Pooling", "config.json")

    def pooling(cfg):
        with open(pooling_path, "w") as f:
            json.dump(cfg, f)
        return read_pooling(folder, 64)

    got = pooling({"word_embedding_dimension": 64, "pooling_mode_cls_token": True})
    assert (got.mode, got.normalize) == ("cls", True)
    assert pooling({"pooling_mode": "lasttoken"}).mode == "last"
    with pytest.raises(WeightsError, match="pooling_mode_max_tokens is not supported"):
        pooling({"pooling_mode_max_tokens": True})
    with pytest.raises(WeightsError, match="exactly one pooling_mode"):
        pooling({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})
    with pytest.raises(WeightsError, match="word_embedding_dimension 32"):
        pooling({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    pooling({"pooling_mode_mean_tokens": True})
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules + [{"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"}], f)
    with pytest.raises(WeightsError, match="modules.json: the sentence-transformers module .*Dense.* is not supported"):
        read_pooling(folder, 64)


def test_only_bert_folders_are_encoders(tiny, tmp_path):
    from tests.helpers import save_tiny_hf

    assert is_encoder_folder(tiny[0])
    save_tiny_hf(str(tmp_path / "llama"), "llama")
    assert not is_encoder_folder(str(tmp_path / "llama"))
    assert not is_encoder_folder(str(tmp_path / "nothing"))
