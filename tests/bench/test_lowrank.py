"""The low-rank benchmark end to end on a tiny model: every row is a checkpoint loaded back with ``LLM``, its
parameter fractions add up, and the plot renders."""

from __future__ import annotations

import os

import torch

from loom.bench.lowrank import plot_lowrank, run_lowrank_bench, settings

TEXT = "The history of the printing press begins in East Asia, long before Gutenberg. " * 40


def test_bench_rows_and_plot(tmp_path, tiny_folder):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: two OpenMP threads on a shared CPU only wait on each other
    try:
        _bench_rows_and_plot(tmp_path, tiny_folder)
    finally:
        torch.set_num_threads(threads)


def _bench_rows_and_plot(tmp_path, tiny_folder):
    corpus, calib = tmp_path / "eval.txt", tmp_path / "calib.txt"
    corpus.write_text(TEXT)
    calib.write_text(TEXT[::-1])
    result = run_lowrank_bench(tiny_folder, corpus=str(corpus), window=32, max_tokens=256, calib=str(calib),
                               samples=2, seq_len=32, keeps=(0.5,), out_dir=str(tmp_path / "out"), progress=False)
    rows = {r["name"]: r for r in result["results"]}
    assert list(rows) == ["dense (fp32)", "SVD keep 0.5", "ASVD keep 0.5"] == [s.name for s in settings((0.5,))]
    assert rows["dense (fp32)"]["decoder_linear_params_kept"] == 1.0 and rows["dense (fp32)"]["perplexity_vs_fp32"] == 0
    for name in ("SVD keep 0.5", "ASVD keep 0.5"):
        r = rows[name]
        assert 0.45 < r["decoder_linear_params_kept"] <= 0.5 and r["model_params_kept"] < 1
        assert os.path.isfile(os.path.join(r["checkpoint"], "config.json")) and r["rank_min"] <= r["rank_max"]
        assert 0 < r["output_error_mean"] < 1 and r["tokens_scored"] == 8 * 31
    path = str(tmp_path / "lowrank.png")
    plot_lowrank(result, path)
    assert os.path.getsize(path) > 10_000
