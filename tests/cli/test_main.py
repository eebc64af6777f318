"""`loom` itself: its commands, and errors as exit status 2 with a message."""

from __future__ import annotations

import pytest

from tests.cli.helpers import run


@pytest.mark.parametrize("argv,msg", [(["generate", "x", "--model", "/nonexistent.gguf"], "no such file"),
                                      (["generate", "x", "--max-tokens", "0"], "max_tokens"),
                                      (["bench", "latency", "--batch", "2", "--peers", "none"], "batch 1")])
def test_errors_exit_2_with_a_message(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2 and msg in err
