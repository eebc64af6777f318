"""T5 (models/t5.py) against transformers' T5ForConditionalGeneration on tiny random checkpoints: decoder logits for a
source and a whole decoder input, fp32, within 1e-4 of the logits' scale; and the decoder over the paged KV cache
(a prefill chunk, then batched one-token steps of sequences with different sources and lengths, blocks scattered)
gives the logits of the uncached forward."""

from __future__ import annotations

import pytest
import torch

from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.models.t5 import CrossBatch
from loom.weights.t5 import load_t5
from tests.t5_checkpoints import VOCAB, save_tiny_t5

CHECKPOINTS = {  # name -> save_tiny_t5 options
    "t5-relu-tied": dict(feed_forward="relu", tied=True),
    "t5-relu-untied": dict(feed_forward="relu", tied=False),
    "t5-gated-gelu-tied": dict(feed_forward="gated-gelu", tied=True),
    "flan-t5-gated-gelu-untied": dict(feed_forward="gated-gelu", tied=False),
    "t5-untied-as-transformers-5-writes-it": dict(feed_forward="gated-gelu", tied=False, untied_v5=True),
    "mt5": dict(feed_forward="gated-gelu", tied=False, model_type="mt5"),
    # 6 heads of 16 (q, k, v wider than d_model), weights scaled down to keep the tiny model as well conditioned
    "t5-wide-heads-gated-silu": dict(feed_forward="gated-silu", tied=True, d_kv=16, num_heads=6, std=0.25),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def pair(request, tmp_path_factory):
    """(transformers' model, loom's) of one checkpoint: 2 encoder and 3 decoder layers."""
    folder = str(tmp_path_factory.mktemp(request.param))
    hf = save_tiny_t5(folder, decoder_layers=3, **CHECKPOINTS[request.param])
    return hf, load_t5(folder).model


def test_decoder_logits_equal_transformers(pair):
    hf, model = pair
    gen = torch.Generator().manual_seed(0)
    for source_len, target_len in ((1, 1), (7, 30), (40, 9)):  # offsets past max_distance (20) too
        source = torch.randint(0, VOCAB, (source_len,), generator=gen)
        target = torch.randint(0, VOCAB, (target_len,), generator=gen)
        with torch.no_grad():
            want = hf(input_ids=source[None], decoder_input_ids=target[None]).logits[0]
        got = model.logits(source, target)
        assert got.shape == want.shape
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-4, (source_len, target_len, err.item())


def test_config_reads_the_checkpoint(pair):
    hf, model = pair
    c = model.config
    assert (c.num_encoder_layers, c.num_decoder_layers, c.num_heads, c.d_kv) == (2, 3, hf.config.num_heads,
                                                                                 hf.config.d_kv)
    assert c.scale_decoder_outputs == (hf.config.model_type == "t5" and hf.config.scale_decoder_outputs)
    assert c.tie_word_embeddings == (hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr())
    assert c.num_parameters() == sum(p.numel() for p in model.parameters())


def test_paged_decoding_equals_the_uncached_forward(pair):
    """Three requests decoded together over a paged cache of 4-token blocks handed out out of order: the first
    prefills 5 tokens in one chunk, then every step decodes one token of each (the batched path)."""
    _, model = pair
    gen = torch.Generator().manual_seed(1)
    sources = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 17, 26)]
    targets = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (12, 9, 10)]
    want = [model.logits(s, t) for s, t in zip(sources, targets)]
    cache = KVCache(model.config, num_blocks=24, block_size=4)
    perm = torch.randperm(24, generator=gen).tolist()
    tables = [perm[0:4], perm[8:12], perm[16:20]]
    cross = [model.cross_kv(model.encode(s)) for s in sources]
    done = [0, 0, 0]

    def step(rows: list[tuple[int, int]]) -> torch.Tensor:
        """rows: (sequence, tokens to compute); returns the logits of every computed token."""
        ids, positions, slots, starts, lens = [], [], [], [0], []
        for i, n in rows:
            c = done[i]
            ids += targets[i][c:c + n].tolist()
            positions += range(c, c + n)
            slots += [tables[i][p // 4] * 4 + p % 4 for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            lens.append(c + n)
            done[i] += n
        width = max(len(tables[i]) for i, _ in rows)
        meta = AttentionMetadata(torch.tensor(positions), starts, lens, torch.tensor(slots),
                                 torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i, _ in rows]))
        batch = CrossBatch([cross[i] for i, _ in rows], starts)
        return model.compute_logits(model(torch.tensor(ids), meta, cache.layers(), batch))

    got: list[list[torch.Tensor]] = [[], [], []]
    out = step([(0, 5), (1, 1)])  # a chunk and a one-token prefill: sequence by sequence
    got[0] += list(out[:5])
    got[1].append(out[5])
    while any(done[i] < len(targets[i]) for i in range(3)):
        rows = [(i, 1) for i in range(3) if done[i] < len(targets[i])]
        out = step(rows)  # one token each: batched self- and cross-attention
        for (i, _), row in zip(rows, out):
            got[i].append(row)
    for g, w in zip(got, want):
        g = torch.stack(g)
        assert (g - w).abs().max() / w.abs().max() < 1e-5


def test_bf16_is_as_close_as_transformers_own_bf16(tmp_path):
    """bf16 weights (oneDNN-packed linears on the CPU where available) give the fp32 logits about as closely as
    transformers' own bf16 model does (which keeps the feed-forward output projection in fp32)."""
    from transformers import T5ForConditionalGeneration

    hf = save_tiny_t5(str(tmp_path), feed_forward="gated-gelu", tied=False, std=0.1)
    hf_bf16 = T5ForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    bf16 = load_t5(str(tmp_path), dtype=torch.bfloat16).model
    assert bf16.dtype == torch.bfloat16
    source, target = torch.arange(3, 30), torch.arange(40, 52)
    with torch.no_grad():
        want = hf(input_ids=source[None], decoder_input_ids=target[None]).logits[0]
        theirs = hf_bf16(input_ids=source[None], decoder_input_ids=target[None]).logits[0].float()
    ours = bf16.logits(source, target).float()
    err = lambda x: ((x - want).abs().max() / want.abs().max()).item()  # noqa: E731
    assert err(ours) < max(2 * err(theirs), 2e-3) and err(ours) < 2e-2
