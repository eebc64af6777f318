"""`loom chat` as a process: a conversation over stdin."""

from __future__ import annotations


def test_chat_is_interactive_and_keeps_the_conversation():
    import subprocess
    import sys

    lines = "What is the capital of France?\nAnd of Italy?\n/reset\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "loom.cli", "chat", "--temperature", "0", "--max-tokens", "24"],
                          input=lines, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "Rome" in proc.stdout  # the second answer used the first turn
    assert sum(line.startswith("[prompt ") for line in proc.stderr.splitlines()) == 2  # one speed line per answer
