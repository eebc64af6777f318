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

Nothing in the header is trusted before it is checked: every count is checked against the bytes
left before it is looped over, n_dims against ggml's limit of 4, each tensor's byte size (computed
in Python ints) against the file's size, the alignment is a power of two; ``config_from_gguf``
checks each value it reads and compares the config with the tensors present (``weights.validate``).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from loom.config import MAX_CONTEXT, ModelConfig, RopeScaling, scaled_context
from loom.weights.dequant import DEQUANTIZERS, dequantize
from loom.weights.errors import WeightsError
from loom.weights.validate import (MAX_ROPE_BASE, check_layer_count, check_scaled_context, check_tensor_shapes,
                                   checked_int, checked_number, layer_indices, show)

GGUF_MAGIC = b"GGUF"
GGUF_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS

# Value type codes -> (struct format, numpy dtype) for scalars.
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")), 1: ("<b", np.dtype("<i1")), 2: ("<H", np.dtype("<u2")),
    3: ("<h", np.dtype("<i2")), 4: ("<I", np.dtype("<u4")), 5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")), 7: ("<?", np.dtype("bool")), 10: ("<Q", np.dtype("<u8")),
    11: ("<q", np.dtype("<i8")), 12: ("<d", np.dtype("<f8")),
}
_STRING, _ARRAY = 8, 9
# The fewest bytes each header entry can take, so that a count is checked against the bytes left
# before anything is looped over or allocated for it.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_STRING_BYTES = 8


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

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """``n``, once ``n`` entries of at least ``item_bytes`` bytes each are known to fit in what is left."""
        left = len(self.buf) - self.pos
        if n * item_bytes > left:
            raise WeightsError(self.path, f"file is truncated or {what} is wrong: {n} entries of at least "
                                          f"{item_bytes} bytes each do not fit in the {left} bytes left")
        return n

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
            if etype == _ARRAY:
                raise WeightsError(self.path, f"{what} is an array of arrays (not supported, as in llama.cpp)")
            if etype not in _SCALARS and etype != _STRING:
                raise WeightsError(self.path, f"unknown metadata value type {etype} in {what}")
            count = self.scalar("<Q", what)
            if etype in _SCALARS:
                dt = _SCALARS[etype][1]
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            self.count(count, _MIN_STRING_BYTES, f"the length of {what}")
            return [self.string(what) for _ in range(count)]
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
        n_kv = cur.count(cur.scalar("<Q", "the metadata count"), _MIN_KV_BYTES, "the metadata count")
        cur.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "the tensor count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("<I", f"the type of {key!r}")
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        alignment = _alignment(self.metadata.get("general.alignment", 32), self.path)
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, code, offset in infos:
            if name in self.tensors:
                raise WeightsError(self.path, "two tensors have this name", name)
            self.tensors[name] = self._locate(name, dims, code, data_start + offset, size)

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple[str, list[int], int, int]:
        """(name, dims, type code, offset) of tensor-info entry ``i``, its n_dims checked before its dims are read."""
        name = cur.string(f"tensor info #{i}")
        what = f"tensor info {name!r}"
        n_dims = cur.scalar("<I", what)
        if n_dims > GGUF_MAX_DIMS:
            raise WeightsError(self.path, f"n_dims is {n_dims}; a GGUF tensor has at most {GGUF_MAX_DIMS}", name)
        dims = [cur.scalar("<Q", what) for _ in range(n_dims)]
        return name, dims, cur.scalar("<I", what), cur.scalar("<Q", what)

    def _locate(self, name: str, dims: list[int], code: int, start: int, size: int) -> TensorInfo:
        """The TensorInfo of a tensor whose data starts at byte ``start``, once its type is known and its
        bytes (counted in Python ints, which do not overflow) are inside the file."""
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            raise WeightsError(self.path, f"unknown ggml type code {code}", name) from None
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if n % block_elems:
            raise WeightsError(self.path, f"{n} elements is not a whole number of {qtype.name} blocks", name)
        nbytes = n // block_elems * block_bytes
        if start + nbytes > size:
            raise WeightsError(self.path, f"file is truncated: tensor data of dims {dims} ends at byte "
                                          f"{start + nbytes}, file has {size}", name)
        return TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

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
    "gemma3": {"permuted": False},  # llama.cpp rotates Gemma's halves (NEOX): its rows are stored as in HF
    "qwen2moe": {"permuted": False},
    "qwen3moe": {"permuted": False},  # with per-head QK-norm (attn_q_norm, attn_k_norm)
}

# llama.cpp's Gemma 3 constants, which its GGUF files do not store: the local layers' RoPE base and
# that every sixth layer is global (unless {arch}.attention.sliding_window_pattern says otherwise)
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_SLIDING_PATTERN = 6


def _scalar(value: Any, key: str, path: str) -> Any:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise WeightsError(path, f"per-layer values for {key!r} are not supported")
        return value[0]
    return value


_REQUIRED = object()


class _ArchMetadata:
    """Checked reads of a GGUF file's ``{arch}.*`` keys: a missing required key, or a value that is not a
    number within its bounds, is a WeightsError naming the file and the key."""

    def __init__(self, g: GGUFFile, arch: str) -> None:
        self.g, self.arch = g, arch

    def key(self, key: str) -> str:
        return f"{self.arch}.{key}"

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        full = self.key(key)
        if full not in self.g.metadata:
            if default is _REQUIRED:
                raise WeightsError(self.g.path, f"metadata key {full!r} is missing")
            return default
        return _scalar(self.g.metadata[full], full, self.g.path)

    def integer(self, key: str, default: Any = _REQUIRED, low: int = 1, high: int | None = None) -> Any:
        if self.key(key) not in self.g.metadata and default is not _REQUIRED:
            return default
        return checked_int(self.raw(key), self.key(key), self.g.path, low, high)

    def number(self, key: str, default: Any = _REQUIRED, low: float | None = None, high: float | None = None,
               above: float | None = None) -> Any:
        if self.key(key) not in self.g.metadata and default is not _REQUIRED:
            return default
        return checked_number(self.raw(key), self.key(key), self.g.path, low, high, above)


def _alignment(value: Any, path: str) -> int:
    """``general.alignment``, the data section's alignment: a positive power of two."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise WeightsError(path, f"general.alignment is {show(value)}; expected a positive power of two")
    return value


def _rope_scaling(m: _ArchMetadata) -> RopeScaling | None:
    """RoPE scaling from llama.cpp's keys: {arch}.rope.scaling.type ("none", "linear", "yarn"),
    .factor, .original_context_length, .yarn_beta_fast, .yarn_beta_slow. A factor of 1 (or 0, or none)
    means no scaling, as llama.cpp reads it."""
    kind = m.raw("rope.scaling.type", None)
    factor = m.number("rope.scaling.factor", None, low=0)
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise WeightsError(m.g.path, f"unsupported rope.scaling.type {show(kind)} (supported: none, linear, yarn)")
    original = m.integer("rope.scaling.original_context_length", None, low=0, high=MAX_CONTEXT)
    try:
        return RopeScaling(kind=kind, factor=factor, original_max_position=original or None,
                           beta_fast=m.number("rope.scaling.yarn_beta_fast", 32.0, above=0),
                           beta_slow=m.number("rope.scaling.yarn_beta_slow", 1.0, above=0))
    except ValueError as e:
        raise WeightsError(m.g.path, str(e)) from None


def _head_dim(m: _ArchMetadata, hidden: int, n_heads: int) -> int:
    """{arch}.attention.key_length, else embedding_length / head_count, which must then divide evenly."""
    head_dim = m.integer("attention.key_length", None)
    if head_dim is not None:
        return head_dim
    if hidden % n_heads:
        raise WeightsError(m.g.path, f"{m.key('embedding_length')} {hidden} is not a multiple of "
                                     f"{m.key('attention.head_count')} {n_heads} (and {m.key('attention.key_length')} "
                                     "is not given)")
    return hidden // n_heads


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """The ModelConfig the file's metadata describes, each value checked against its bounds and the whole
    against the file's tensors (the layer count, every tensor's shape), so that a model built from it
    allocates no more than the file holds."""
    meta = g.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise WeightsError(g.path, "metadata has no general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise WeightsError(g.path, f"unsupported architecture {show(arch)} "
                                   f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    m = _ArchMetadata(g, arch)
    n_layers = m.integer("block_count")
    check_layer_count(n_layers, layer_indices(g.tensors, "blk."), m.key("block_count"), "blk.", g.path)
    n_heads = m.integer("attention.head_count")
    hidden = m.integer("embedding_length")
    head_dim = _head_dim(m, hidden, n_heads)
    vocab = m.integer("vocab_size", None)
    if vocab is None:
        vocab = g.info("token_embd.weight").shape[0]
    rope_scaling = _rope_scaling(m)
    context, rope_scaling = scaled_context(m.integer("context_length", 2048, high=MAX_CONTEXT), rope_scaling)
    check_scaled_context(context, m.key("rope.scaling.factor"), g.path)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    settings = dict(
        vocab_size=vocab, hidden_size=hidden, num_layers=n_layers, num_heads=n_heads,
        num_kv_heads=m.integer("attention.head_count_kv", n_heads), head_dim=head_dim,
        intermediate_size=m.integer("feed_forward_length"), activation="silu", gated_mlp=True, norm="rmsnorm",
        norm_eps=m.number("attention.layer_norm_rms_epsilon", 1e-5, low=0), position="rope",
        rope_theta=m.number("rope.freq_base", 10000.0, above=1, high=MAX_ROPE_BASE),
        rotary_dim=m.integer("rope.dimension_count", head_dim), rope_scaling=rope_scaling,
        max_position_embeddings=context, qkv_bias="blk.0.attn_q.bias" in g,
        attn_out_bias="blk.0.attn_output.bias" in g, tie_word_embeddings="output.weight" not in g,
        sliding_window=m.integer("attention.sliding_window", None, low=0) or None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=tuple(eos_ids), architecture=arch,
        name=str(meta.get("general.name", "")), **_moe_settings(m),
    )
    if arch == "gemma3":
        settings.update(_gemma3_settings(m, n_layers, hidden, head_dim, settings["sliding_window"]))
    try:
        config = ModelConfig(**settings)
    except (ValueError, TypeError) as e:
        raise WeightsError(g.path, str(e)) from None
    check_tensor_shapes(config, gguf_tensor_sources(config), lambda name: _stored_shape(g, name), g.path)
    return config


def _gemma3_settings(m: _ArchMetadata, n_layers: int, hidden: int, head_dim: int,
                     window: int | None) -> dict[str, Any]:
    """What a Gemma 3 GGUF implies beyond the Llama keys (weights/hf_gemma.py describes the model). Its norm
    weights are stored with Gemma's 1 already added (llama.cpp's converter does it), so they load as they are.
    The softmax scale is 1 / sqrt(head_dim), as llama.cpp takes it for every size but 27B (whose
    query_pre_attn_scalar is hidden / heads; a file of that shape is refused rather than guessed)."""
    softcap = m.number("final_logit_softcapping", None)
    if softcap:
        raise WeightsError(m.g.path, f"{m.key('final_logit_softcapping')} = {softcap}: logit soft-capping "
                                     "(Gemma 2) is not supported")
    if hidden == 5376:
        raise WeightsError(m.g.path, "Gemma 3 27B scales queries by (hidden / heads)^-1/2, which its GGUF does not "
                                     "record; loom runs the other Gemma 3 sizes")
    per_layer = m.g.metadata.get(m.key("attention.sliding_window_pattern"))
    if isinstance(per_layer, list):  # one flag per layer (true: sliding)
        if len(per_layer) != n_layers:
            raise WeightsError(m.g.path, f"{m.key('attention.sliding_window_pattern')} has {len(per_layer)} entries "
                                         f"for {n_layers} layers")
        sliding = tuple(bool(x) for x in per_layer)
    else:
        pattern = m.integer("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
        sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
    return dict(activation="gelu_tanh", norm_placement="sandwich", qk_norm=True, embedding_scale=math.sqrt(hidden),
                attn_scale=head_dim ** -0.5, rope_local_theta=GEMMA3_LOCAL_ROPE_BASE,
                sliding_window_layers=sliding if window else None)


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
        if config.qk_norm:
            src[p + "attn.q_norm.weight"] = [b + "attn_q_norm.weight"]
            src[p + "attn.k_norm.weight"] = [b + "attn_k_norm.weight"]
        if config.norm_placement == "sandwich":
            src[p + "post_attn_norm.weight"] = [b + "post_attention_norm.weight"]
            src[p + "post_mlp_norm.weight"] = [b + "post_ffw_norm.weight"]
    return _with_experts(config, src)


def read_gguf_tensor(g: GGUFFile, config: ModelConfig, name: str) -> torch.Tensor:
    """A GGUF tensor as float32 in HF layout (Q/K un-permuted for Llama-style files)."""
    t = _read_source(g, name)
    if GGUF_ARCHITECTURES[config.architecture]["permuted"]:
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            t = unpermute_rope(t, config.num_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            t = unpermute_rope(t, config.num_kv_heads)
    return t


# Mixture of experts (llama.cpp's layout) ---------------------------------------------------------------
#
# A layer's experts are stacked, one tensor per projection: blk.N.ffn_{gate,up,down}_exps.weight [E, rows, cols]
# (torch order), the router blk.N.ffn_gate_inp.weight [E, hidden]; Qwen2-MoE's shared expert is
# ffn_{gate,up,down}_shexp with its gate ffn_gate_inp_shexp [hidden]. A source named "NAME[e]" is expert e's
# [rows, cols] slice of NAME: it is read (and dequantized) alone, from its own bytes.

_DEFAULT_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}  # llama.cpp's norm_w for each architecture
_SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def _moe_settings(m: _ArchMetadata) -> dict[str, Any]:
    """The ModelConfig fields of ``{arch}.expert_*`` ({} for a dense model), and Qwen3-MoE's QK-norm."""
    n = m.integer("expert_count", 0, low=0)
    if not n:
        return {}
    gating = m.integer("expert_gating_func", _SOFTMAX_GATING, low=0)
    if gating != _SOFTMAX_GATING:
        raise WeightsError(m.g.path, f"{m.key('expert_gating_func')} is {gating}: loom's router is a softmax "
                                     f"({_SOFTMAX_GATING})")
    if "blk.0.ffn_gate_exps.weight" not in m.g and "blk.0.ffn_gate.0.weight" in m.g:
        raise WeightsError(m.g.path, "experts are stored one tensor each (blk.N.ffn_gate.E.weight, an old llama.cpp "
                                     "layout); loom reads them stacked (blk.N.ffn_gate_exps.weight): convert the "
                                     "file again with a current llama.cpp")
    norm = m.raw("expert_weights_norm", _DEFAULT_NORM_TOPK.get(m.arch, True))
    if not isinstance(norm, bool):
        raise WeightsError(m.g.path, f"{m.key('expert_weights_norm')} is {show(norm)}; expected a boolean")
    return dict(num_experts=n, num_experts_per_tok=m.integer("expert_used_count", high=n),
                moe_intermediate_size=m.integer("expert_feed_forward_length", None) or m.integer("feed_forward_length"),
                shared_expert_intermediate_size=m.integer("expert_shared_feed_forward_length", 0, low=0),
                norm_topk_prob=norm, **({"qk_norm": True} if m.arch == "qwen3moe" else {}))


def _with_experts(config: ModelConfig, src: dict[str, list[str]]) -> dict[str, list[str]]:
    """``src`` with each MoE layer's dense MLP sources replaced by its router's, experts' and shared expert's."""
    for i in range(config.num_layers):
        if not config.is_moe_layer(i):
            continue
        b, p = f"blk.{i}.", f"layers.{i}.mlp."
        del src[p + "gate_up_proj.weight"], src[p + "down_proj.weight"]
        src[p + "router.weight"] = [b + "ffn_gate_inp.weight"]
        for e in range(config.num_experts):
            src[p + f"experts.{e}.gate_up_proj.weight"] = [b + f"ffn_gate_exps.weight[{e}]",
                                                           b + f"ffn_up_exps.weight[{e}]"]
            src[p + f"experts.{e}.down_proj.weight"] = [b + f"ffn_down_exps.weight[{e}]"]
        if config.shared_expert_intermediate_size:
            src[p + "shared_expert.gate_up_proj.weight"] = [b + "ffn_gate_shexp.weight", b + "ffn_up_shexp.weight"]
            src[p + "shared_expert.down_proj.weight"] = [b + "ffn_down_shexp.weight"]
            src[p + "shared_expert_gate.weight"] = [b + "ffn_gate_inp_shexp.weight"]
    return src


def _expert_slice(g: GGUFFile, name: str) -> tuple[TensorInfo, int] | None:
    """(the stacked tensor, e) for a source named "NAME[e]" (None for a plain name), e checked against the stack."""
    if not name.endswith("]"):
        return None
    base, _, index = name[:-1].rpartition("[")
    info = g.info(base)
    e = int(index)
    if len(info.shape) != 3 or e >= info.shape[0]:
        raise WeightsError(g.path, f"shape {info.shape} holds no expert {e}: expected a stack [experts, rows, cols] "
                                   "with as many experts as the expert_count metadata", base)
    return info, e


def _stored_shape(g: GGUFFile, name: str) -> tuple[int, ...]:
    """A source's shape in torch order: an expert's slice of its stack; a shared-expert gate [hidden] as [1, hidden]."""
    part = _expert_slice(g, name)
    if part is not None:
        return part[0].shape[1:]
    shape = g.info(name).shape
    return (1, *shape) if name.endswith("ffn_gate_inp_shexp.weight") and len(shape) == 1 else shape


def _read_source(g: GGUFFile, name: str) -> torch.Tensor:
    """A source as float32: expert e of a stack dequantized from its own bytes (a whole number of blocks)."""
    part = _expert_slice(g, name)
    if part is None:
        t = g.tensor(name)
        return t.reshape(1, -1) if name.endswith("ffn_gate_inp_shexp.weight") and t.dim() == 1 else t
    info, e = part
    if info.qtype not in DEQUANTIZERS:
        raise WeightsError(g.path, f"unsupported quantization type {info.qtype.name} "
                                   f"(supported: {', '.join(t.name for t in DEQUANTIZERS)})", info.name)
    per = info.nbytes // info.shape[0]
    block_elems, _ = GGML_QUANT_SIZES[info.qtype]
    if math.prod(info.shape[1:]) % block_elems:
        raise WeightsError(g.path, f"an expert's {math.prod(info.shape[1:])} elements are not whole "
                                   f"{info.qtype.name} blocks", info.name)
    arr = np.frombuffer(g._mmap, dtype=np.uint8, count=per, offset=info.offset + e * per)
    return dequantize(torch.from_numpy(arr.copy()), info.qtype, info.shape[1:])
