"""`loom analyze ...` in-process: JSON and tables."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli.helpers import run as run_loom


def run(capsys, *argv: str) -> tuple[int, str, str]:
    return run_loom(capsys, "analyze", *argv)


def test_roofline_json_and_table(capsys):
    code, out, _ = run(capsys, "roofline", "--model", "llama-2-7b", "--phase", "decode", "--n", "1", "--l", "128",
                       "--hardware", "rtx4060-seed002", "--json")
    r = json.loads(out)
    assert code == 0 and r["phase"] == "decode" and r["ridge_flop_per_byte"] == pytest.approx(20.04, abs=0.01)
    assert r["groups"]["attn_proj"]["flops"] == 4096 * 2**20
    assert {op["bound"] for op in r["operators"]} == {"memory"}
    assert r["per_token"]["tokens_per_s_bound"] == pytest.approx(768e9 / r["per_token"]["bytes"], rel=1e-9)
    code, out, _ = run(capsys, "roofline", "--model", "llama-3-8b", "--phase", "prefill", "--n", "256",
                       "--bandwidth", "1000", "--flops", "100")
    assert code == 0
    for text in ("attn.k_proj", "[256 x 4096] @ [4096 x 1024]", "compute", "attention act-to-act matmuls",
                 "lm_head", "per token"):
        assert text in out


def test_intensity_tables(capsys):
    code, out, _ = run(capsys, "intensity")
    assert code == 0 and "1.999024" in out and "247.2833" in out and "3453.49" in out
    code, out, _ = run(capsys, "intensity", "--json")
    assert json.loads(out)["MHA (act-to-act)"]["128"]["4096"] is None


def test_memory(capsys):
    code, out, _ = run(capsys, "memory", "--params", "1B", "--dtype", "fp32", "--train", "--json")
    assert code == 0 and json.loads(out)["total"] == 24e9
    code, out, _ = run(capsys, "memory", "--model", "llama-3-8b", "--dtype", "fp16", "--context", "8192", "--json")
    assert json.loads(out)["kv_cache"] == 2**30
    code, out, _ = run(capsys, "memory", "--model", "smollm2-135m", "--dtype", "bf16", "--train", "--optimizer",
                       "adamw", "--mixed-precision")
    assert code == 0 and "optimizer states" in out and "fp32 master weights" in out
    code, out, _ = run(capsys, "memory", "--model", "deepseek-v2-lite", "--dtype", "bf16", "--context", "32768")
    assert code == 0 and "(as MHA: 8.9x)" in out and "KV per token: 31,104 B" in out and "as MHA 276,480 B" in out


def test_offload_and_speculative(capsys):
    code, out, _ = run(capsys, "offload", "--model-bytes", "7.7GB", "--memory-bytes", "3.5GB",
                       "--storage-bandwidth", "4GB/s", "--json")
    r = json.loads(out)
    assert code == 0 and r["latency_s"] == pytest.approx(1.05) and round(r["tokens_per_s"], 2) == 0.95
    code, out, _ = run(capsys, "offload", "--model-bytes", "7.7GB", "--memory-bytes", "3.5GB",
                       "--storage-bandwidth", "4GB")
    assert "1.05 s/token" in out and "0.952 tokens/s" in out
    code, out, _ = run(capsys, "speculative", "--k", "4", "--acceptance", "0.8", "--cost-ratio", "0.1", "--json")
    r = json.loads(out)
    assert r["expected_tokens_per_step"] == pytest.approx((1 - 0.8**5) / 0.2)
    code, out, _ = run(capsys, "speculative", "--k", "4", "--acceptance", "0.8", "--cost-ratio", "0.1")
    assert "best k" in out


def test_probe(capsys):
    code, out, _ = run(capsys, "probe", "--buffer", "4MiB", "--matmul-size", "64", "--repeats", "1", "--json")
    r = json.loads(out)
    assert code == 0 and r["bandwidth"] > 0 and r["matmul_flops"] > 0


def test_plot_from_saved_bench(capsys, tmp_path, smollm_path):
    from tests.analysis.test_measured_plot import fake_bench

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(fake_bench(smollm_path)))
    out_png = str(tmp_path / "r.png")
    code, out, _ = run(capsys, "plot", "--hardware", "rtx4060", "--bench-json", str(bench), "--out", out_png,
                       "--json")
    r = json.loads(out)
    assert code == 0 and os.path.getsize(out_png) > 0
    assert [m["phase"] for m in r["measured"]] == ["prefill", "decode"]
    assert all(m["fraction_of_roof"] > 0 for m in r["measured"])
    code, out, _ = run(capsys, "plot", "--model", "llama-2-7b", "--hardware", "rtx4060-seed002", "--out", out_png)
    assert code == 0 and "wrote" in out


def test_errors_exit_2(capsys):
    code, _, err = run(capsys, "roofline", "--model", "gpt-5", "--hardware", "h100")
    assert code == 2 and "unknown model" in err
    code, _, err = run(capsys, "roofline", "--bandwidth", "100")
    assert code == 2 and "go together" in err
    code, _, err = run(capsys, "plot", "--model", "llama-2-7b", "--measure", "--hardware", "h100")
    assert code == 2 and "preset" in err
    code, _, err = run(capsys, "roofline", "--model", "deepseek-v2-lite", "--hardware", "h100")
    assert code == 2 and "latent attention" in err


def test_analyze_parallel(capsys, tmp_path):
    """`loom analyze parallel`: llama-2-7b's TP decode table on 1/2/4/8 A100s over NVLink and PCIe and the DP
    table; with --measure, this machine's loopback all-reduces, the fit and one TP=2 decode step's
    all-reduces; the plot written; a bad link named."""
    code, out, err = run(capsys, "parallel", "--json")
    assert code == 0, err
    d = json.loads(out)
    rows = d["tensor_parallel_decode"]
    assert [(r["link"][:6], r["ranks"]) for r in rows] == [("NVLink", n) for n in (1, 2, 4, 8)] + \
        [("PCIe 4", n) for n in (1, 2, 4, 8)]
    assert all(r["allreduce_bytes"] == 8192 and r["allreduces"] == 64 for r in rows)
    assert {s["strategy"] for s in d["data_parallel_step"]} == {"ddp", "fsdp"} and d["measured"] is None
    png = tmp_path / "parallel.png"
    code, out, err = run(capsys, "parallel", "--measure", "--repeats", "10", "--plot", str(png))
    assert code == 0, err
    assert "a TP=2 decode step of smollm2-135m: 60 all-reduces of 2.3 kB" in out and "fit: alpha" in out
    assert png.stat().st_size > 10_000
    code, out, err = run(capsys, "parallel", "--links", "nvlink,token-ring")
    assert code != 0 and "unknown link 'token-ring'" in err
