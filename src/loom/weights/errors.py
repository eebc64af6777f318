"""Errors raised while reading model files; messages name the file and, where known, the tensor."""

from __future__ import annotations


class WeightsError(ValueError):
    """A model file is malformed, truncated, unsupported or does not match its config."""

    def __init__(self, path: str, message: str, tensor: str | None = None) -> None:
        where = f"{path}" + (f" (tensor {tensor!r})" if tensor else "")
        super().__init__(f"{where}: {message}")
        self.path = path
        self.tensor = tensor
