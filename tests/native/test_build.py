"""The native build's contract: any failure falls back to the PyTorch twins with one warning; LOOM_NATIVE=0
turns it off; the compilation time is reported apart from loading."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from loom import native


def _unavailable_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "loom.native" and r.levelno == logging.WARNING]


def test_a_missing_source_falls_back_with_one_warning(monkeypatch, caplog):
    # as when an install leaves a header out of the package data: no FileNotFoundError escapes
    monkeypatch.setattr(native, "HEADERS", ["kernels.h", "not_installed.h"])
    with caplog.at_level(logging.WARNING, logger="loom.native"):
        assert native.available.__wrapped__() is False
    (record,) = _unavailable_warnings(caplog)
    assert "FileNotFoundError" in record.getMessage() and "not_installed.h" in record.getMessage()


def test_a_failing_compiler_falls_back_with_one_warning(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="loom.native"):
        assert native.available.__wrapped__() is False
    (record,) = _unavailable_warnings(caplog)
    assert "Ninja is required" in record.getMessage() and "PyTorch paths" in record.getMessage()


def test_loom_native_0_disables_without_building(monkeypatch, caplog):
    monkeypatch.setenv("LOOM_NATIVE", "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("LOOM_NATIVE=0 must not build"))
    with caplog.at_level(logging.WARNING, logger="loom.native"):
        assert native.available.__wrapped__() is False
    assert not _unavailable_warnings(caplog)


def test_a_warm_cache_loads_silently():
    """Once built (here, by this session), a new process loads the library: no compile line, 0 s compiling.
    (The cold case, a first build that reports itself, is in tests/test_packaging.py.)"""
    assert native.available()
    code = "from loom import native; print(native.available(), native.build_seconds())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "0.0"]
    assert "compiling" not in proc.stderr
