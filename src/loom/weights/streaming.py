"""Decoder layers streamed from the model file, layer by layer, under a memory budget (seed 002, "Speed limit
for offloading"; FlexGen, Sheng et al. 2023, for the overlap of reads with compute).

A model loaded with ``load_model(decoder_layers=False)`` holds everything but its decoder layers; its
``LayerSources`` say which bytes of the file make each layer. ``LayerBuilder`` turns those bytes into a
``DecoderLayer`` with the loader's own functions (``source_tensor``, ``native_linear``), so a streamed layer
is bit for bit the layer ``load_model`` builds; GGUF Q4 / Q8 blocks are read as stored (4-bit stays 4-bit on
the way) and become the same ``QuantizedLinear``. ``LayerStream`` puts a ``StreamedLayer`` in each streamed
layer's place: a background thread reads the next layers into ``buffers`` slots while the current one
computes (double buffering with 2, triple with 3), in the order every forward takes them (0, 1, ..., L-1,
then the next forward's first). A slot is a layer built once (its first layer); from then on each layer read
into it is written into its tensors in place, straight from the file's bytes (weights/slots.py), and the
slot goes back to the reader as soon as its layer has run.

Reads go around the page cache, so that the bytes counted are bytes read from storage: ``O_DIRECT`` (page-
aligned reads into a page-aligned buffer) where the file system takes it, else ``pread`` followed by
``posix_fadvise(DONTNEED)`` on the range just read (and on the whole file when the stream opens, since
loading the rest of the model went through the page cache). ``StorageReader.mode`` says which.
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from loom.layers.linear import pack_bf16_linears
from loom.models.transformer import DecoderLayer, Transformer
from loom.weights.errors import WeightsError
from loom.weights.gguf import GGUFFile, TensorInfo, read_gguf_tensor
from loom.weights.hf import TensorLocation, read_hf_tensor
from loom.weights.loader import LayerSources, native_linear, place_native_linears, source_tensor
from loom.weights.slots import Settings, SlotFiller, layer_settings, layer_structure, refillable

READ_BUFFERS = 2  # one being read into while the other fills a slot
PAGE = 4096  # O_DIRECT's alignment of offsets, lengths and buffers (a multiple of every logical block size)
MERGE_GAP = 1 << 16  # tensors of a layer this close in the file are read in one request (the gap is read too)
DIRECT_IO = "O_DIRECT"
FADVISE = "pread + posix_fadvise(DONTNEED)"

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _page_floor(x: int) -> int:
    return x // PAGE * PAGE


def _page_ceil(x: int) -> int:
    return -(-x // PAGE) * PAGE


@dataclass(frozen=True)
class Span:
    """One read: ``nbytes`` from byte ``offset`` of ``path``, holding the tensors ``names``."""

    path: str
    offset: int
    nbytes: int
    names: tuple[str, ...]

    @property
    def buffer_bytes(self) -> int:
        """Room it takes in the read buffer: whole pages around it (O_DIRECT reads whole pages)."""
        return _page_ceil(self.offset + self.nbytes) - _page_floor(self.offset)


def layer_spans(locations: dict[str, TensorLocation], names: Sequence[str]) -> list[Span]:
    """The reads that fetch tensors ``names``: neighbours in a file (at most MERGE_GAP apart) in one read."""
    spans: list[Span] = []
    for name in sorted(set(names), key=lambda n: (locations[n].path, locations[n].offset)):
        loc = locations[name]
        last = spans[-1] if spans else None
        if last is not None and last.path == loc.path and loc.offset - (last.offset + last.nbytes) <= MERGE_GAP:
            end = max(last.offset + last.nbytes, loc.offset + loc.nbytes)
            spans[-1] = Span(last.path, last.offset, end - last.offset, last.names + (name,))
        else:
            spans.append(Span(loc.path, loc.offset, loc.nbytes, (name,)))
    return spans


class StorageReader:
    """Reads byte ranges of the model's files into a page-aligned buffer, around the page cache.

    ``direct``: True insists on O_DIRECT (an OSError where the file system refuses it), False uses pread +
    posix_fadvise(DONTNEED), None tries O_DIRECT and falls back. ``bytes_read`` counts what was asked of
    storage (whole pages under O_DIRECT)."""

    def __init__(self, paths: Sequence[str], direct: bool | None = None) -> None:
        self.paths = sorted(set(paths))
        self.direct = direct
        self.mode = DIRECT_IO if direct is not False and hasattr(os, "O_DIRECT") else FADVISE
        if direct and not hasattr(os, "O_DIRECT"):
            raise OSError("O_DIRECT is not available on this system")
        self._fds: dict[str, int] = {}
        try:
            for path in self.paths:
                self._fds[path] = self._open(path)
        except BaseException:
            self.close()
            raise
        self.bytes_read = 0

    def _open(self, path: str) -> int:
        if self.mode == DIRECT_IO:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                if self.direct:
                    raise
                self._fall_back()
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # what loading the rest left in the page cache
        return fd

    def _fall_back(self) -> None:
        """O_DIRECT refused (e.g. tmpfs): reopen everything for pread + fadvise."""
        self.mode = FADVISE
        for path, fd in list(self._fds.items()):
            os.close(fd)
            self._fds[path] = self._open(path)

    def read(self, span: Span, buf: mmap.mmap, at: int) -> int:
        """Read ``span`` into ``buf`` from byte ``at`` (page-aligned); return where its first byte landed."""
        if self.mode == DIRECT_IO:
            start = _page_floor(span.offset)
            try:
                self._read_fully(self._fds[span.path], buf, at, span.buffer_bytes, start, span.offset + span.nbytes)
                return at + span.offset - start
            except OSError:
                if self.direct:
                    raise
                self._fall_back()  # EINVAL on the first read: a file system that opens O_DIRECT but cannot read so
        fd = self._fds[span.path]
        self._read_fully(fd, buf, at, span.nbytes, span.offset, span.offset + span.nbytes)
        os.posix_fadvise(fd, span.offset, span.nbytes, os.POSIX_FADV_DONTNEED)
        return at

    def _read_fully(self, fd: int, buf: mmap.mmap, at: int, length: int, offset: int, needed_end: int) -> None:
        view = memoryview(buf)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[at + done:at + length]], offset + done)
            if n == 0:
                break  # end of file (an O_DIRECT read rounded up past it)
            done += n
            self.bytes_read += n
        if offset + done < needed_end:
            raise WeightsError(self.paths[0], f"short read: wanted bytes up to {needed_end}, got {offset + done}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _BufferedGGUF(GGUFFile):
    """A parsed GGUF file whose tensors' bytes come from a dict (one layer's, just read), not from a mapping."""

    def __init__(self, path: str, tensors: dict[str, TensorInfo], data: dict[str, torch.Tensor]) -> None:
        self.path, self.metadata, self.tensors = path, {}, tensors  # no parsing: the loader's header
        self._data = data

    def raw(self, name: str) -> torch.Tensor:
        return self._data[name]

    def close(self) -> None:
        pass


class _BufferedCheckpoint:
    """The ``tensor`` method of a SafetensorsCheckpoint over one layer's bytes, just read."""

    def __init__(self, locations: dict[str, TensorLocation], data: dict[str, torch.Tensor]) -> None:
        self.locations, self.data = locations, data

    def tensor(self, name: str) -> torch.Tensor:
        loc = self.locations[name]
        dtype = SAFETENSORS_DTYPES.get(loc.dtype or "")
        if dtype is None:
            raise WeightsError(loc.path, f"unsupported safetensors dtype {loc.dtype} (supported: "
                                         f"{', '.join(SAFETENSORS_DTYPES)})", name)
        return self.data[name].view(dtype).reshape(loc.shape or ())


def module_bytes(module: nn.Module, besides: nn.Module | None = None) -> int:
    """Bytes of memory a module's tensors hold: parameters, buffers and the tensors its modules keep as plain
    attributes (a quantized linear's kernel copies, a packed weight), each storage counted once; ``besides``:
    leave out what that module holds too (a layer's share of the model's rotary tables)."""
    mine, theirs = _storages(module), _storages(besides) if besides is not None else {}
    return sum(n for key, n in mine.items() if key not in theirs)


def _storages(module: nn.Module) -> dict[int, int]:
    seen: dict[int, int] = {}

    def visit(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except (NotImplementedError, RuntimeError):  # an opaque (oneDNN-packed) weight: no storage to share
                seen[id(t)] = t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            for x in t:
                visit(x)

    for m in module.modules():
        for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            visit(t)
        for value in vars(m).values():
            if isinstance(value, (torch.Tensor, list, tuple)):
                visit(value)
    seen.pop(0, None)  # empty tensors
    return seen


class LayerBuilder:
    """Builds decoder layer ``i`` of ``model`` from its bytes, as ``load_model`` builds it (see module doc)."""

    def __init__(self, model: Transformer, sources: LayerSources) -> None:
        self.model, self.sources = model, sources
        self.config = sources.config
        self._by_layer: list[dict[str, list[str]]] = [{} for _ in range(self.config.num_layers)]
        for name, names in sources.sources.items():
            index, _, rest = name[len("layers."):].partition(".")
            self._by_layer[int(index)][rest] = names

    def tensor_names(self, i: int) -> list[str]:
        return [n for names in self._by_layer[i].values() for n in names]

    def spans(self, i: int) -> list[Span]:
        return layer_spans(self.sources.locations, self.tensor_names(i))

    def file_bytes(self, i: int) -> int:
        """Bytes of layer ``i``'s tensors in the file (what one pass over it must read)."""
        return sum(self.sources.locations[n].nbytes for n in set(self.tensor_names(i)))

    def build(self, i: int, data: dict[str, torch.Tensor]) -> DecoderLayer:
        """Layer ``i`` from ``data``: its source tensors' bytes (uint8 tensors that the layer may keep)."""
        src, config, model = self.sources, self.config, self.model
        rotary = model.local_rotary if model.local_layers[i] else model.rotary
        layer = DecoderLayer(config, i, rotary, src.kernel, src.dtype)
        sources = dict(self._by_layer[i])
        filled: set[str] = set()  # biases that came with a quantized linear
        if src.format == "gguf":
            g = _BufferedGGUF(src.path, src.gguf_tensors, data)  # type: ignore[arg-type]
            fetch: Callable[[str], torch.Tensor] = lambda n: read_gguf_tensor(g, config, n)  # noqa: E731
            if src.native:
                def place(target: str, parts: list[str], bias: list[str] | None) -> bool:
                    module = native_linear(g, config, parts, bias)
                    if module is not None:
                        parent, _, child = target.rpartition(".")
                        setattr(layer.get_submodule(parent) if parent else layer, child, module)
                    return module is not None

                filled |= place_native_linears(sources, place)
        else:
            ckpt = _BufferedCheckpoint(src.locations, data)
            fetch = lambda n: read_hf_tensor(config, ckpt, n)  # type: ignore[arg-type]  # noqa: E731
        params = dict(layer.named_parameters())
        missing = set(params) - set(sources) - filled
        if missing:
            raise WeightsError(src.path, f"no source for parameters of layer {i}: {sorted(missing)[:5]}")
        for name, names in sources.items():
            param = params[name]
            param.data = source_tensor(tuple(param.shape), names, src.row_splits.get(f"layers.{i}.{name}"), fetch,
                                       src.path, src.dtype)
        layer.eval().requires_grad_(False)
        if src.dtype == torch.bfloat16:
            pack_bf16_linears(layer)  # as load_model packs a bf16 CPU model's linears
        return layer


class StreamedLayer(nn.Module):
    """Decoder layer ``index`` in a streaming model: its weights are taken from the stream just before it runs
    and dropped right after (the stream is not a submodule: it holds no parameters of the model)."""

    def __init__(self, stream: LayerStream, index: int) -> None:
        super().__init__()
        self.index = index
        self._stream = weakref.proxy(stream)

    def forward(self, h: torch.Tensor, meta: Any, kv_cache: Any, rope: Any = None) -> torch.Tensor:
        layer = self._stream.acquire(self.index)
        t0 = time.perf_counter()
        try:
            return layer(h, meta, kv_cache, rope)
        finally:
            self._stream.stats.compute_seconds += time.perf_counter() - t0
            self._stream.release(self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, streamed"


@dataclass
class StreamStats:
    """What streaming has done so far: layers and bytes read from storage; seconds the reader thread spent
    reading, filling slots in place (weights/slots.py) and building layers anew (a slot's first layer, or
    one of another structure); seconds the forward spent waiting for a layer and computing streamed layers."""

    layers_read: int = 0
    bytes_read: int = 0
    layers_filled: int = 0
    layers_built: int = 0
    read_seconds: float = 0.0
    fill_seconds: float = 0.0
    build_seconds: float = 0.0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"layers_read": self.layers_read, "bytes_read": self.bytes_read, "layers_filled": self.layers_filled,
                "layers_built": self.layers_built, "read_seconds": round(self.read_seconds, 4),
                "fill_seconds": round(self.fill_seconds, 4), "build_seconds": round(self.build_seconds, 4),
                "wait_seconds": round(self.wait_seconds, 4), "compute_seconds": round(self.compute_seconds, 4)}


class LayerStream:
    """The streamed layers of ``model`` (see module doc). ``load(i)`` reads and builds layer ``i`` at once (for
    the resident layers and to measure a layer, before ``start``); ``start(layers)`` puts a StreamedLayer in
    each of ``layers``' places and starts the reader thread; ``close`` stops it."""

    def __init__(self, model: Transformer, sources: LayerSources, buffers: int = 2,
                 direct: bool | None = None) -> None:
        if buffers < 2:
            raise ValueError(f"streaming needs at least 2 layer buffers (one computing, one being read), got {buffers}")
        self.model = model
        self.builder = LayerBuilder(model, sources)
        self.buffers = buffers
        self.reader = StorageReader([loc.path for loc in sources.locations.values()], direct)
        one = max(sum(s.buffer_bytes for s in self.builder.spans(i)) for i in range(sources.config.num_layers))
        # two read buffers: the next layer is read into one while the other's bytes fill a slot
        self._read_buffers = [mmap.mmap(-1, one) for _ in range(READ_BUFFERS)]  # page-aligned, as O_DIRECT needs
        self.read_buffer_bytes = READ_BUFFERS * one
        self.stats = StreamStats()
        self.layers: list[int] = []
        self._lock = threading.Lock()  # one reader of the buffer at a time
        self.filler = SlotFiller(self.builder)
        # the slots: a built layer each (None until the first is read), refilled in place by the reader
        self._slots: list[DecoderLayer | None] = [None] * buffers
        self._slot_structure: list[tuple[Any, ...] | None] = [None] * buffers
        self._structure: dict[int, tuple[Any, ...]] = {}
        self._settings: dict[int, Settings] = {}
        self._free: queue.Queue[int] = queue.Queue()  # free slots; -1 stops the reader
        for k in range(buffers):
            self._free.put(k)
        self._ready: queue.Queue[tuple[int, int, BaseException | None]] = queue.Queue()
        self._free_reads: queue.Queue[int] = queue.Queue()  # free read buffers; -1 stops the I/O thread
        for b in range(READ_BUFFERS):
            self._free_reads.put(b)
        self._read: queue.Queue[tuple[int, int, dict[str, torch.Tensor] | None, BaseException | None]] = \
            queue.Queue()  # layers read, for the fill thread; layer -1 stops it
        self._io_thread: threading.Thread | None = None
        self._live: dict[int, int] = {}  # layer -> its slot, while it computes
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def mode(self) -> str:
        return self.reader.mode

    def _read_layer(self, i: int, b: int = 0) -> dict[str, torch.Tensor]:
        """Layer ``i``'s source tensors read into read buffer ``b``: views of it, valid until it is read into
        again."""
        buffer = self._read_buffers[b]
        t0 = time.perf_counter()
        before = self.reader.bytes_read
        data: dict[str, torch.Tensor] = {}
        at = 0
        for span in self.builder.spans(i):
            first = self.reader.read(span, buffer, at)
            for name in span.names:
                loc = self.builder.sources.locations[name]
                data[name] = torch.frombuffer(buffer, dtype=torch.uint8, count=loc.nbytes,
                                              offset=first + loc.offset - span.offset)
            at += span.buffer_bytes
        s = self.stats
        s.layers_read += 1
        s.bytes_read += self.reader.bytes_read - before
        s.read_seconds += time.perf_counter() - t0
        return data

    def _build(self, i: int, data: dict[str, torch.Tensor]) -> DecoderLayer:
        t0 = time.perf_counter()
        # copies: a built layer may keep its source tensors, and the buffer is read into again
        layer = self.builder.build(i, {name: t.clone() for name, t in data.items()})
        self.stats.layers_built += 1
        self.stats.build_seconds += time.perf_counter() - t0
        return layer

    def load(self, i: int) -> DecoderLayer:
        """Read layer ``i``'s bytes from storage and build it (a layer of its own, not a slot; before ``start``)."""
        if self._thread is not None:
            raise RuntimeError("LayerStream.load reads layers before start(); the stream's threads read after it")
        with self._lock:
            data = self._read_layer(i)
            layer = self._build(i, data)
            del data
        return layer

    def _fill(self, i: int, k: int, data: dict[str, torch.Tensor]) -> None:
        """Layer ``i``'s bytes (just read) into slot ``k``: refilled in place when the slot has layer ``i``'s
        structure, else built anew there."""
        with self._lock:
            slot = self._slots[k]
            if slot is not None and self._slot_structure[k] == self._structure[i] and refillable(slot):
                t0 = time.perf_counter()
                self.filler.fill(slot, i, data, self._settings[i])
                self.stats.layers_filled += 1
                self.stats.fill_seconds += time.perf_counter() - t0
            else:
                self._slots[k] = None  # the old layer's memory goes before the new one is built
                del slot
                self._slots[k] = self._build(i, data)
                self._slot_structure[k] = self._structure[i]
            del data

    def start(self, layers: Sequence[int]) -> None:
        """Stream ``layers`` (in forward order) from now on."""
        if self._thread is not None:
            raise RuntimeError("the stream is already running")
        self.layers = sorted(layers)
        if not self.layers:
            return
        model, config = self.model, self.builder.config
        shared = {id(m) for m in (model.rotary, model.local_rotary) if m is not None}
        for i in self.layers:
            # a skeleton of layer i (its tensors allocated, never touched): its structure and settings
            skeleton = DecoderLayer(config, i, model.local_rotary if model.local_layers[i] else model.rotary,
                                    self.builder.sources.kernel, self.builder.sources.dtype)
            self._structure[i] = layer_structure(skeleton, shared)
            self._settings[i] = layer_settings(skeleton, shared)
            del skeleton
            self.model.layers[i] = StreamedLayer(self, i)
        ref = weakref.ref(self)
        self._io_thread = threading.Thread(target=_read_ahead, args=(ref, self._free_reads, self._read,
                                                                     list(self.layers)),
                                           name="loom-layer-read", daemon=True)
        self._thread = threading.Thread(target=_prefetch, args=(ref, self._free, self._read),
                                        name="loom-layer-fill", daemon=True)
        weakref.finalize(self, _stop, self._free, self._free_reads, self._read)  # dropped without close(): threads end
        atexit.register(_close_at_exit, ref)  # no layer half built while the interpreter ends
        self._io_thread.start()
        self._thread.start()

    def _prefetch_one(self, i: int, k: int, b: int, data: dict[str, torch.Tensor]) -> bool:
        try:
            self._fill(i, k, data)
            del data
            self._free_reads.put(b)
            self._ready.put((i, k, None))
            return True
        except BaseException as e:  # handed to the forward that waits for this layer
            self._ready.put((i, k, e))
            return False

    def acquire(self, i: int) -> DecoderLayer:
        """Layer ``i``, once the reader has built it. Layers left over from a forward that stopped early are
        dropped first, and built layers other than ``i`` (read ahead for that forward) are skipped."""
        for j in list(self._live):
            self.release(j)
        t0 = time.perf_counter()
        while True:
            j, k, error = self._ready.get()
            if error is not None:
                self.close()
                raise RuntimeError(f"streaming decoder layer {j} from {self.builder.sources.path} failed: "
                                   f"{error}") from error
            if j == i:
                break
            self._free.put(k)
        self.stats.wait_seconds += time.perf_counter() - t0
        self._live[i] = k
        return self._slots[k]  # type: ignore[return-value]

    def release(self, i: int) -> None:
        """Layer ``i`` has run: give its slot back to the reader."""
        k = self._live.pop(i, None)
        if k is not None:
            self._free.put(k)

    def describe(self) -> str:
        n = len(self.layers)
        return (f"{n} layer{'s' if n != 1 else ''} streamed through {self.buffers} buffers "
                f"(reads: {self.mode}, {READ_BUFFERS} read buffers, {self.read_buffer_bytes} bytes)")

    def close(self) -> None:
        """Stop the reader thread and close the files (the streamed layers can no longer run)."""
        if self._closed:
            return
        self._closed = True
        _stop(self._free, self._free_reads, self._read)
        for thread in (self._io_thread, self._thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30)
        while not self._ready.empty():
            self._ready.get_nowait()
        self._live.clear()
        self._slots = [None] * self.buffers
        self.reader.close()


def _close_at_exit(ref: weakref.ref[LayerStream]) -> None:
    stream = ref()
    if stream is not None:
        stream.close()


def _stop(free: queue.Queue[int], free_reads: queue.Queue[int], read: queue.Queue[Any]) -> None:
    free.put(-1)
    free_reads.put(-1)
    read.put((-1, -1, None, None))


def _read_ahead(ref: weakref.ref[LayerStream], free_reads: queue.Queue[int], read: queue.Queue[Any],
                order: list[int]) -> None:
    """The I/O thread: read the streamed layers in forward order, forever, into free read buffers (``preadv``
    releases the GIL: the reads overlap the fill and the forward). It holds the stream only while it reads."""
    for i in itertools.cycle(order):
        b = free_reads.get()
        stream = ref()
        if b < 0 or stream is None or stream._closed:
            return
        try:
            read.put((i, b, stream._read_layer(i, b), None))
        except BaseException as e:  # handed on to the fill thread, then to the forward
            read.put((i, b, None, e))
            return
        del stream


def _prefetch(ref: weakref.ref[LayerStream], free: queue.Queue[int], read: queue.Queue[Any]) -> None:
    """The fill thread: put each layer read into a free slot, in the order read. It holds the stream only while
    it fills, so that a dropped stream (or ``close``) ends it."""
    while True:
        k = free.get()
        i, b, data, error = read.get()
        stream = ref()
        if k < 0 or i < 0 or stream is None or stream._closed:
            return
        if error is not None:
            stream._ready.put((i, k, error))
            return
        ok = stream._prefetch_one(i, k, b, data)
        del data
        del stream
        if not ok:
            return
