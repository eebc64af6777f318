"""The CUDA-graph decode step's arithmetic (``decode_forward``), checked on the CPU against the module path.

``decode_forward`` is plain PyTorch with fixed shapes, so it runs on any device; the capture and replay
themselves need a GPU and are tested in tests_cuda/.
"""

from __future__ import annotations

import pytest
import torch

from loom.config import CacheConfig, ModelConfig
from loom.engine.kv_cache import KVCache
from loom.engine.runner import ModelRunner
from loom.engine.step.cuda_graph import CudaGraphStep, decode_forward, width_bucket
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
            max_position_embeddings=64)


def _paged_decode(model: Transformer, seqs: list[list[int]], prompt: list[int], step) -> list[torch.Tensor]:
    """Prefill each sequence's first tokens through the module path into scattered blocks of 4, then
    decode the rest together with ``step(tokens, positions, slots, tables, lens, cache)``."""
    g = torch.Generator().manual_seed(6)
    bs, cache = 4, KVCache(model.config, 30, 4)
    perm = torch.randperm(30, generator=g).tolist()
    tables = [perm[0:4], perm[4:6], perm[6:10]]
    slot = lambda i, p: tables[i][p // bs] * bs + p % bs  # noqa: E731
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    with torch.inference_mode():
        ids = torch.tensor([t for i, s in enumerate(seqs) for t in s[:prompt[i]]])
        starts = [0]
        for n in prompt:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(torch.cat([torch.arange(n) for n in prompt]), starts, prompt,
                                 torch.tensor([slot(i, p) for i in range(len(seqs)) for p in range(prompt[i])]),
                                 torch.tensor([t + [0] * (4 - len(t)) for t in tables]))
        model(ids, meta, cache.layers())
        pos = list(prompt)
        while any(p < len(s) for p, s in zip(pos, seqs)):
            live = [i for i in range(len(seqs)) if pos[i] < len(seqs[i])]
            width = max(-(-(pos[i] + 1) // bs) for i in live)
            logits = step(torch.tensor([seqs[i][pos[i]] for i in live]), torch.tensor([pos[i] for i in live]),
                          torch.tensor([slot(i, pos[i]) for i in live]),
                          torch.tensor([(tables[i] + [0] * 4)[:width] for i in live]),
                          torch.tensor([pos[i] + 1 for i in live]), cache)
            for row, i in enumerate(live):
                got[i].append(logits[row].float())
                pos[i] += 1
    return [torch.stack(x) for x in got]


@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True),
                                   dict(num_kv_heads=4, qkv_bias=True), dict(num_kv_heads=2, sliding_window=6),
                                   dict(num_kv_heads=2, gated_mlp=False, activation="gelu", mlp_bias=True),
                                   dict(num_kv_heads=2, rotary_dim=8), dict(num_kv_heads=2, position="learned"),
                                   # OPT-350m-like (pre-norm here): table read at p + 2, a narrower embedding
                                   dict(position="learned", position_offset=2, embedding_size=32, norm="layernorm",
                                        gated_mlp=False, activation="relu", qkv_bias=True, attn_out_bias=True,
                                        mlp_bias=True, embedding_norm=True, tie_word_embeddings=True)])
def test_decode_forward_equals_each_sequence_alone(extra):
    model = Transformer(ModelConfig(**BASE, **extra)).init_random(5, std=0.2)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 4, 14)]
    with torch.no_grad():
        want = [model.logits(torch.tensor(s)) for s in seqs]
    prompt = [3, 2, 7]

    def step(tokens, positions, slots, tables, lens, cache):
        return decode_forward(model, tokens, positions, slots, tables, lens, list(cache.k), list(cache.v))

    got = _paged_decode(model, seqs, prompt, step)
    for i in range(3):  # fp32 rounding, relative to the logits' scale
        assert (got[i] - want[i][prompt[i]:]).abs().max() < 1e-5 * max(1.0, float(want[i].abs().max()))


def test_decode_forward_runs_quantized_linears():
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.compress.quantize.rtn import QuantConfig

    model = quantize(Transformer(ModelConfig(**BASE, num_kv_heads=2)).init_random(0, std=0.2),
                     QuantizeRecipe("rtn", QuantConfig(4, 32), backend="reference"))
    seqs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (8, 5, 11)]
    with torch.no_grad():
        want = [model.logits(torch.tensor(s)) for s in seqs]
    got = _paged_decode(model, seqs, [2, 2, 4], lambda t, p, s, tb, ln, c: decode_forward(
        model, t, p, s, tb, ln, list(c.k), list(c.v)))
    for i in range(3):
        assert (got[i] - want[i][[2, 2, 4][i]:]).abs().max() < 1e-4


def test_width_buckets_are_powers_of_two_that_cover_the_width():
    assert [width_bucket(w) for w in (1, 2, 3, 4, 5, 8, 9, 100)] == [1, 2, 4, 4, 8, 8, 16, 128]


def test_cpu_models_get_the_scripted_step_and_no_cuda_graphs():
    model = Transformer(ModelConfig(**BASE, num_kv_heads=2)).init_random(0)
    assert not CudaGraphStep.takes(model)  # a CPU model
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphStep(model, torch.zeros(1), torch.zeros(1))
    fp = KVCache.from_config(model.config, CacheConfig(num_blocks=4))
    assert [s.name for s in ModelRunner(model, fp).steps][-2:] == ["scripted", "module"]
    with pytest.raises(ValueError, match="cuda_graph decode step cannot run this model"):
        ModelRunner(model, fp, "cuda_graph")
    int8 = KVCache.from_config(model.config, CacheConfig(num_blocks=4, kv_dtype="int8"))
    assert [s.name for s in ModelRunner(model, int8).steps] == ["scripted", "module"]  # the only one reading int8
