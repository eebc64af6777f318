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


def test_lora_serving_options():
    """--lora-modules takes NAME=DIR or vLLM's JSON, in one flag or several, and turns per-request adapters
    on (so do --enable-lora and --allow-runtime-lora); without them the engine serves none."""
    from loom.cli.options import engine_config, lora_serving_config
    from loom.config import LoraServingConfig

    args = parse("--lora-modules", "sql=/a/sql", '{"name": "chat", "path": "/a/chat", "base_model_name": "m"}',
                 "--lora-modules", "x=/a/x=1", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "3")
    modules = (("sql", "/a/sql"), ("chat", "/a/chat"), ("x", "/a/x=1"))
    assert engine_config(args).lora_serving == LoraServingConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=3,
                                                                 modules=modules)
    assert lora_serving_config(parse()) is None and engine_config(parse()).lora_serving is None
    assert not parse().allow_runtime_lora
    for flag in ("--enable-lora", "--allow-runtime-lora"):
        assert lora_serving_config(parse(flag)) == LoraServingConfig()  # max_loras 4, max_lora_rank 16
    assert lora_serving_config(parse("--enable-lora", "--lora-dtype", "float32")).dtype == "float32"


@pytest.mark.parametrize("entry", ["sql", "=/a/sql", "sql=", '{"name": "sql"}', '{"name": "", "path": "/a"}',
                                   '{"name": "sql", "path": ', '["sql", "/a"]'])
def test_bad_lora_modules_are_argparse_errors(entry, capsys):
    with pytest.raises(SystemExit) as e:
        parse("--lora-modules", entry)
    assert e.value.code == 2
    assert "--lora-modules" in capsys.readouterr().err
