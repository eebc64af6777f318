"""loom as a user installs it: a wheel of this checkout in a fresh virtual environment, run as `loom generate`.

The wheel must carry everything the native build reads (sources and headers), or the first model load
would fail instead of compiling the kernels. The fresh venv gets its dependencies (torch, ...) from the
running venv through a .pth file holding that venv's site-packages path: a plain path line, so that
venv's own .pth files (loom's editable install among them) are not processed and the wheel's loom is
the one imported. Each run gets its own cache (LOOM_CACHE), so the native build is a cold one and never
touches the checkout's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.helpers import save_tiny_hf

ROOT = Path(__file__).resolve().parent.parent
COMPILED = re.compile(r"compiling loom's native kernels, once: ([0-9.]+) s")
LOAD = re.compile(r"\bload ([0-9.]+) s\b")


def _byte_level_tokenizer(folder: Path) -> None:
    """tokenizer.json for the 256 byte tokens (no merges), as a tiny model with vocab_size 256 needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def _build_wheel(dest: Path) -> Path:
    """A wheel of the checkout, built from a copy of its packaging inputs (the checkout gets no build/)."""
    src = dest / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", "-w", str(dest / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (dest / "dist").glob("loom-*.whl")
    return wheel


def _fresh_venv(wheel: Path, folder: Path) -> Path:
    """A new venv with the wheel installed and this venv's packages appended to its path; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    # the wheel first: pip then sees an empty venv (the running venv's loom is not yet on its path)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "loom_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin"


def _env(bin_dir: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LOOM_NATIVE")}
    # as an activated venv: its scripts first, then the running venv's (ninja, if pip installed it there)
    env["PATH"] = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env.get("PATH", "")])
    env["LOOM_CACHE"] = str(cache)
    env.update(extra)
    return env


def _generate(bin_dir: Path, model: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "loom"), "generate", "Hello", "--model", str(model), "--temperature", "0",
                           "--max-tokens", "8", "--ignore-eos"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=cwd)


def test_wheel_installs_and_generates_with_and_without_native_kernels(tmp_path):
    model = tmp_path / "tiny-llama"
    save_tiny_hf(str(model), "llama")
    _byte_level_tokenizer(model)
    wheel = _build_wheel(tmp_path)
    bin_dir = _fresh_venv(wheel, tmp_path / "venv")
    python = bin_dir / "python"
    cwd = tmp_path  # not the checkout: nothing of it on the path
    cache_on, cache_off = tmp_path / "cache-native", tmp_path / "cache-torch"

    probe = ("import json, loom, loom.native as n; "
             "print(json.dumps({'file': loom.__file__, 'available': n.available(), 'compiled': n.build_seconds()}))")
    where = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                                      env=_env(bin_dir, tmp_path / "cache-probe", LOOM_NATIVE="0"), cwd=cwd).stdout)
    assert Path(where["file"]).resolve().is_relative_to((tmp_path / "venv").resolve()), where
    assert where["available"] is False and where["compiled"] == 0.0

    # Native kernels on, cold cache: the wheel's own sources compile, once, and the run says so apart from "load".
    on = _generate(bin_dir, model, _env(bin_dir, cache_on), cwd)
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip(), on.stderr
    assert "unavailable" not in on.stderr, on.stderr
    compiled = [float(s) for s in COMPILED.findall(on.stderr)]
    assert len(compiled) == 1, on.stderr
    libraries = list((cache_on / "native").glob("*/loom_native_*.so"))
    assert len(libraries) == 1, on.stderr
    (load,) = [float(s) for s in LOAD.findall(on.stderr)]
    assert load < compiled[0], on.stderr  # the compilation is not folded into the model's load time

    # The same cache is warm now: the wheel's loom loads the library without compiling or saying anything.
    warm = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                                     env=_env(bin_dir, cache_on), cwd=cwd).stdout)
    assert warm["available"] is True and warm["compiled"] == 0.0

    # LOOM_NATIVE=0: the PyTorch twins, nothing built.
    off = _generate(bin_dir, model, _env(bin_dir, cache_off, LOOM_NATIVE="0"), cwd)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip(), off.stderr
    assert not COMPILED.search(off.stderr) and "unavailable" not in off.stderr, off.stderr
    assert not (cache_off / "native").exists()


def test_every_file_the_native_build_reads_is_package_data():
    """The rule behind the wheel test, checked without building: pyproject's globs cover each source and header."""
    import fnmatch
    import tomllib

    from loom import native

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["loom"]
    assert "kernels.h" in native.HEADERS
    for name in native.SOURCES + native.HEADERS:
        assert any(fnmatch.fnmatch(f"native/{name}", p) for p in patterns), f"native/{name} is not package data"
