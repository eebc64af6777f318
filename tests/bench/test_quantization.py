"""The quantization benchmark's pieces: its peer perplexity is the same protocol as loom's, and its plot renders."""

from __future__ import annotations

import os

import pytest

from loom.bench.quantization import SETTINGS, _hf_perplexity, plot_quantization
from loom.eval.perplexity import perplexity


def test_peer_perplexity_uses_the_same_protocol(smollm, smollm_hf):
    ids = smollm.tokenizer.encode("The history of the printing press begins in East Asia. " * 30)
    ours = perplexity(smollm.model, ids, 64, max_tokens=256, progress=False)
    theirs, scored = _hf_perplexity(smollm_hf, ids, 64, 256, progress=False)
    assert scored == ours.tokens_scored == 4 * 63
    assert abs(theirs / ours.perplexity - 1) < 1e-4


def test_settings_cover_the_issue_and_the_plot_renders(tmp_path):
    names = {s.name for s in SETTINGS}
    for want in ("fp32", "W4 g32 AWQ", "W4 g64 GPTQ", "W3 g64 RTN", "W8A8 naive", "KV int8 (fp32 weights)"):
        assert want in names
    assert next(s for s in SETTINGS if s.name == "W4 g64 RTN").nominal_bits(576) == 4.5
    result = {"corpus": "/x/britannica-11th.txt", "window": 512, "results": [
        {"name": s.name, "method": s.method, "nominal_bits_per_weight": s.nominal_bits(576), "perplexity": 20.0 + i}
        for i, s in enumerate(SETTINGS)]}
    path = str(tmp_path / "q.png")
    plot_quantization(result, path)
    assert os.path.getsize(path) > 10_000


def test_merged_rows_keep_earlier_results_in_setting_order():
    """--merge: a row run again replaces the earlier one, the rest are kept, all in the settings' order, each
    with its perplexity relative to the dense row's."""
    from loom.bench.quantization import merged_rows

    earlier = {"results": [{"name": "dense", "method": "fp32", "perplexity": 20.0},
                           {"name": "a", "method": "rtn", "perplexity": 30.0},
                           {"name": "b", "method": "gptq", "perplexity": 25.0}]}
    rows = merged_rows([{"name": "a", "method": "rtn", "perplexity": 22.0}, {"name": "peer", "method": "hf"}],
                       earlier, ["dense", "a", "b"])
    assert [r["name"] for r in rows] == ["dense", "a", "b", "peer"]
    assert [r.get("perplexity_vs_fp32") for r in rows] == [0.0, pytest.approx(0.1), pytest.approx(0.25), None]
