"""`loom serve` options: the API key from the command line, a file or the environment; request limits."""

from __future__ import annotations

import pytest

from loom.cli import build_parser
from loom.cli.serve import api_key
from loom.serve.protocol import RequestLimits


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_api_key_from_flag_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOM_API_KEY", raising=False)
    assert api_key(parse()) is None
    assert api_key(parse("--api-key", "k1")) == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    assert api_key(parse("--api-key-file", str(key_file))) == "k2"  # keeps the key out of `ps`
    monkeypatch.setenv("LOOM_API_KEY", "k3")
    assert api_key(parse()) == "k3"
    assert api_key(parse("--api-key", "k1")) == "k1"
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        api_key(parse("--api-key-file", str(key_file)))


def test_request_limit_options():
    args = parse("--max-prompts-per-request", "8", "--max-stop-strings", "4", "--max-stop-chars", "100",
                 "--request-body-timeout", "5")
    assert RequestLimits(args.max_prompts_per_request, args.max_stop_strings, args.max_stop_chars) == \
        RequestLimits(8, 4, 100)
    assert args.request_body_timeout == 5.0 and parse().max_waiting == 256
