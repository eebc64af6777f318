"""GGUF files: header and metadata parsing, tensor access, and metadata -> ModelConfig.

The layout (GGUF v2/v3, little-endian):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64 x n_dims, type: u32, offset: u64)
    padding to `general.alignment` (default 32) | tensor data (each offset relative to here)

Strings are u64 length + UTF-8 bytes. Dims are listed fastest-varying first, so a 2-D tensor
listed as [in, out] is row-major [out, in] in torch order.

We parse the header ourselves: ``gguf.GGUFReader`` builds a numpy view per array element and
takes ~5 s on a 49k-token vocabulary, where this takes a fraction of a second. The ``gguf``
package still provides the type enums and block sizes, and is the reference our dequantizers
are tested against.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from loom.config import ModelConfig, RopeScaling, scaled_context
from loom.weights.dequant import DEQUANTIZERS, dequantize
from loom.weights.errors import WeightsError

GGUF_MAGIC = b"GGUF"

# Value type codes -> (struct format, numpy dtype) for scalars.
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")), 1: ("<b", np.dtype("<i1")), 2: ("<H", np.dtype("<u2")),
    3: ("<h", np.dtype("<i2")), 4: ("<I", np.dtype("<u4")), 5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")), 7: ("<?", np.dtype("bool")), 10: ("<Q", np.dtype("<u8")),
    11: ("<q", np.dtype("<i8")), 12: ("<d", np.dtype("<f8")),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest-varying first)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Sequential little-endian reads over a buffer, raising on truncation."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise WeightsError(self.path, f"file is truncated while reading {what} "
                                          f"(needs {self.pos + n} bytes, has {len(self.buf)})")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _SCALARS:
                dt = _SCALARS[etype][1]
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            return [self.value(etype, what) for _ in range(count)]
        raise WeightsError(self.path, f"unknown metadata value type {vtype} in {what}")


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (dict), ``tensors`` (name -> TensorInfo), raw tensor access."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise WeightsError(self.path, "file is empty")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise WeightsError(self.path, f"cannot open: {e.strerror or e}") from e
        buf = memoryview(self._mmap)
        cur = _Cursor(buf, self.path)
        cur.need(4, "the magic number")
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            raise WeightsError(self.path, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "the version")
        if self.version not in (2, 3):
            raise WeightsError(self.path, f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = cur.scalar("<Q", "the tensor count")
        n_kv = cur.scalar("<Q", "the metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("<I", f"the type of {key!r}")
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor info #{i}")
            n_dims = cur.scalar("<I", f"tensor info {name!r}")
            dims = [cur.scalar("<Q", f"tensor info {name!r}") for _ in range(n_dims)]
            code = cur.scalar("<I", f"tensor info {name!r}")
            offset = cur.scalar("<Q", f"tensor info {name!r}")
            infos.append((name, dims, code, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, code, offset in infos:
            try:
                qtype = GGMLQuantizationType(code)
            except ValueError:
                raise WeightsError(self.path, f"unknown ggml type code {code}", name) from None
            block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            if n % block_elems:
                raise WeightsError(self.path, f"{n} elements is not a whole number of {qtype.name} blocks", name)
            nbytes = n // block_elems * block_bytes
            start = data_start + offset
            if start + nbytes > size:
                raise WeightsError(self.path, f"file is truncated: tensor data ends at byte {start + nbytes}, "
                                              f"file has {size}", name)
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor (a copy, so the file can be closed)."""
        info = self.info(name)
        arr = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(arr.copy())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsError(self.path, "tensor is missing from the file", name) from None

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in torch shape."""
        info = self.info(name)
        if info.qtype not in DEQUANTIZERS:
            raise WeightsError(self.path, f"unsupported quantization type {info.qtype.name} "
                                          f"(supported: {', '.join(t.name for t in DEQUANTIZERS)})", name)
        return dequantize(self.raw(name), info.qtype, info.shape)

    def close(self) -> None:
        self._mmap.close()


# Metadata -> ModelConfig ------------------------------------------------------------------------

# Architectures whose blocks are Llama-shaped: RMSNorm, SwiGLU, rotate-half RoPE after un-permuting.
# "permuted": llama.cpp's converter interleaves Q/K rows for its GPT-J-style RoPE; Qwen2 uses the
# NeoX style and is stored as-is.
GGUF_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"permuted": True},
    "mistral": {"permuted": True},
    "qwen2": {"permuted": False},
}


def _scalar(value: Any, key: str, path: str) -> Any:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise WeightsError(path, f"per-layer values for {key!r} are not supported")
        return value[0]
    return value


def _rope_scaling(get: Callable[[str, Any], Any], path: str) -> RopeScaling | None:
    """RoPE scaling from llama.cpp's keys: {arch}.rope.scaling.type ("none", "linear", "yarn"),
    .factor, .original_context_length, .yarn_beta_fast, .yarn_beta_slow. A factor of 1 (or none)
    means no scaling, as llama.cpp reads it."""
    kind = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None)
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise WeightsError(path, f"unsupported rope.scaling.type {kind!r} (supported: none, linear, yarn)")
    original = get("rope.scaling.original_context_length", None)
    try:
        return RopeScaling(kind=kind, factor=float(factor), original_max_position=int(original) if original else None,
                           beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
                           beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)))
    except ValueError as e:
        raise WeightsError(path, str(e)) from None


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    meta = g.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise WeightsError(g.path, "metadata has no general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise WeightsError(g.path, f"unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})")

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if default is KeyError:
                raise WeightsError(g.path, f"metadata key {full!r} is missing")
            return default
        return _scalar(meta[full], full, g.path)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = g.info("token_embd.weight").shape[0]
    rope_scaling = _rope_scaling(get, g.path)
    context, rope_scaling = scaled_context(int(get("context_length", 2048)), rope_scaling)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    window = get("attention.sliding_window", None)
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        activation="silu",
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        position="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rotary_dim=int(get("rope.dimension_count", head_dim)),
        rope_scaling=rope_scaling,
        max_position_embeddings=context,
        qkv_bias="blk.0.attn_q.bias" in g,
        attn_out_bias="blk.0.attn_output.bias" in g,
        tie_word_embeddings="output.weight" not in g,
        sliding_window=int(window) if window else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(eos_ids),
        architecture=arch,
        name=str(meta.get("general.name", "")),
    )


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves).

    The converter maps rows of each head [x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1}] to
    [x_0, x_{d/2}, x_1, x_{d/2+1}, ...]; reading them back two at a time and transposing restores it.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_sources(config: ModelConfig) -> dict[str, list[str]]:
    """loom parameter name -> GGUF tensor names concatenated (along rows) to make it."""
    src: dict[str, list[str]] = {"embed_tokens.weight": ["token_embd.weight"], "norm.weight": ["output_norm.weight"]}
    if not config.tie_word_embeddings:
        src["lm_head.weight"] = ["output.weight"]
    for i in range(config.num_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        src[p + "attn_norm.weight"] = [b + "attn_norm.weight"]
        src[p + "attn.qkv_proj.weight"] = [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"]
        if config.qkv_bias:
            src[p + "attn.qkv_proj.bias"] = [b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias"]
        src[p + "attn.o_proj.weight"] = [b + "attn_output.weight"]
        if config.attn_out_bias:
            src[p + "attn.o_proj.bias"] = [b + "attn_output.bias"]
        src[p + "mlp_norm.weight"] = [b + "ffn_norm.weight"]
        src[p + "mlp.gate_up_proj.weight"] = [b + "ffn_gate.weight", b + "ffn_up.weight"]
        src[p + "mlp.down_proj.weight"] = [b + "ffn_down.weight"]
    return src


def read_gguf_tensor(g: GGUFFile, config: ModelConfig, name: str) -> torch.Tensor:
    """A GGUF tensor as float32 in HF layout (Q/K un-permuted for Llama-style files)."""
    t = g.tensor(name)
    if GGUF_ARCHITECTURES[config.architecture]["permuted"]:
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            t = unpermute_rope(t, config.num_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            t = unpermute_rope(t, config.num_kv_heads)
    return t
