"""`loom info` on the default model."""

from __future__ import annotations

import json

from tests.cli.helpers import run


def test_info(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == 134_515_008
    assert info["kv_bytes_per_token"]["fp32"] == 30 * 3 * 64 * 2 * 4
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    code, out, _ = run(capsys, "info")
    assert "GiB" in out and "KV per token" in out
