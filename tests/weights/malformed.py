"""Builders for model files whose metadata lies: a GGUF serializer that writes whatever it is given
(counts, dims and alignment included), and HF folders whose config.json or index is edited."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, replace
from typing import Any

from loom.weights.gguf import GGUFFile

# GGUF value types (gguf.GGUFValueType)
U32, I32, F32, BOOL, STRING, ARRAY, U64, F64 = 4, 5, 6, 7, 8, 9, 10, 12
_FORMATS = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", F64: "<d"}


@dataclass(frozen=True)
class Typed:
    """A metadata value with its GGUF type spelled out (``type`` ARRAY needs ``element``)."""

    type: int
    value: Any
    element: int | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor-info entry and its data; ``n_dims`` overrides len(dims) as written."""

    name: str
    dims: tuple[int, ...]  # GGUF order (fastest-varying first)
    code: int
    data: bytes
    n_dims: int | None = None


@dataclass
class GGUFSpec:
    """Everything a GGUF file says: metadata (in order), tensors (data aligned to 32 bytes) and trailing bytes."""

    metadata: dict[str, Any]
    tensors: list[TensorSpec]
    sparse_tail: int = 0  # zero bytes appended as a hole (costs no disk)
    tensor_count: int | None = None  # the count the header claims (None: the true one)

    def with_metadata(self, changes: dict[str, Any]) -> GGUFSpec:
        """A copy with metadata keys set (a value of None removes the key)."""
        meta = dict(self.metadata)
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        return replace(self, metadata=meta)

    def with_tensor(self, name: str, **changes: Any) -> GGUFSpec:
        return replace(self, tensors=[replace(t, **changes) if t.name == name else t for t in self.tensors])


def read_spec(path: str) -> GGUFSpec:
    """The spec of a valid GGUF file (loom's reader gives the metadata and the raw tensor bytes)."""
    g = GGUFFile(path)
    try:
        tensors = [TensorSpec(name, tuple(reversed(info.shape)), int(info.qtype), bytes(g.raw(name).numpy()))
                   for name, info in g.tensors.items()]
        return GGUFSpec(dict(g.metadata), tensors)
    finally:
        g.close()


def _typed(value: Any) -> Typed:
    if isinstance(value, Typed):
        return value
    if isinstance(value, bool):
        return Typed(BOOL, value)
    if isinstance(value, int):
        return Typed(U32 if 0 <= value < 2**32 else U64, value)
    if isinstance(value, float):
        return Typed(F32, value)
    if isinstance(value, str):
        return Typed(STRING, value)
    if isinstance(value, list):
        element = _typed(value[0]).type if value else STRING
        return Typed(ARRAY, value, I32 if element == U32 else element)
    raise TypeError(f"no GGUF type for {value!r}")


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any, element: int | None = None) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        return struct.pack("<IQ", element, len(value)) + b"".join(_value(element, v) for v in value)
    return struct.pack(_FORMATS[vtype], value)


def gguf_bytes(spec: GGUFSpec) -> bytes:
    """The file ``spec`` describes, written as told (no check of what it says)."""
    n_tensors = len(spec.tensors) if spec.tensor_count is None else spec.tensor_count
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(spec.metadata)))
    for key, value in spec.metadata.items():
        t = _typed(value)
        out += _string(key) + struct.pack("<I", t.type) + _value(t.type, t.value, t.element)
    offsets, offset = [], 0
    for t in spec.tensors:
        offsets.append(offset)
        offset += -(-len(t.data) // 32) * 32
    for t, off in zip(spec.tensors, offsets):
        n_dims = len(t.dims) if t.n_dims is None else t.n_dims
        out += _string(t.name) + struct.pack("<I", n_dims) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
        out += struct.pack("<IQ", t.code, off)
    out += b"\0" * (-len(out) % 32)
    for t, off in zip(spec.tensors, offsets):
        out += t.data + b"\0" * (-len(t.data) % 32)
    return bytes(out)


def write_gguf(path: str, spec: GGUFSpec) -> str:
    with open(path, "wb") as f:
        f.write(gguf_bytes(spec))
        if spec.sparse_tail:
            f.truncate(f.tell() + spec.sparse_tail)
    return path


def edited_hf_folder(base: str, folder: str, config: Any = None, index: Any = None) -> str:
    """A copy of the HF folder ``base`` with config.json replaced by ``config`` (a dict edited from the base's
    via a function, or any JSON value) and, if given, a model.safetensors.index.json holding ``index``."""
    shutil.copytree(base, folder)
    path = os.path.join(folder, "config.json")
    if callable(config):
        with open(path) as f:
            config = config(json.load(f))
    if config is not None:
        with open(path, "w") as f:
            json.dump(config, f)
    if index is not None:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    return folder
