"""Model files whose metadata lies (issue 17): each is refused before anything is sized from the lie, as a
WeightsError from the Python API and as one line `loom: error: FILE: ...` with exit status 2 from
`loom info` and `loom generate`, in well under 5 s and 500 MB.

Each GGUF case is the tiny valid file re-serialized with one value changed; each HF case is the tiny valid
folder with config.json or its index edited. A few run in a child process, so that the exit status, the
stderr and the peak resident size are the real ones of the `loom` command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest
import torch

from loom.cli import main
from loom.config import ModelConfig
from loom.models.transformer import Transformer
from loom.weights.errors import WeightsError
from loom.weights.loader import load_model
from loom.weights.validate import parameter_part_shapes
from tests.helpers import tiny_llama_gguf
from tests.weights.malformed import F32, GGUFSpec, Typed, edited_hf_folder, read_spec, write_gguf

SECONDS = 5.0
RSS_BYTES = 500 << 20
A = "llama."


@dataclass(frozen=True)
class Case:
    """A malformed file: how it is made from the valid GGUF spec or HF folder, and what loom must say."""

    id: str
    message: str  # a regex the error must match
    gguf: Callable[[GGUFSpec], GGUFSpec] | None = None
    hf: dict[str, Any] | None = None  # edited_hf_folder's keywords


def meta(changes: dict[str, Any]) -> Callable[[GGUFSpec], GGUFSpec]:
    return lambda spec: spec.with_metadata(changes)


def config(**changes: Any) -> dict[str, Any]:
    """edited_hf_folder keywords setting config.json keys (a value of ... removes the key)."""
    return {"config": lambda c: {k: v for k, v in {**c, **changes}.items() if v is not ...}}


CASES = [
    # GGUF: sizes with no tensors behind them
    Case("gguf-block_count-2^31", r"llama\.block_count is 2147483648, but the file holds tensors for 2 layers "
                                  r"\(blk\.0 to blk\.1\)", gguf=meta({A + "block_count": 2**31})),
    Case("gguf-embedding-2^31", r"\(tensor 'token_embd\.weight'\): shape \(256, 64\) does not match the config's "
                                r"\(256, 2147483648\)", gguf=meta({A + "embedding_length": 2**31})),
    Case("gguf-ffn-2^31", r"\(tensor 'blk\.0\.ffn_gate\.weight'\): shape \(128, 64\) does not match the config's "
                          r"\(2147483648, 64\)", gguf=meta({A + "feed_forward_length": 2**31})),
    Case("gguf-vocab-2^31", r"\(tensor 'token_embd\.weight'\): shape \(256, 64\) does not match the config's "
                            r"\(2147483648, 64\)", gguf=meta({A + "vocab_size": 2**31})),
    # GGUF: values out of bounds
    Case("gguf-context-2^27", r"llama\.context_length is 134217728; expected an integer between 1 and 16777216",
         gguf=meta({A + "context_length": 2**27})),
    Case("gguf-context-2^32-1", r"llama\.context_length is 4294967295; expected an integer between 1 and 16777216",
         gguf=meta({A + "context_length": 2**32 - 1})),
    Case("gguf-head_count-0", r"llama\.attention\.head_count is 0; expected a positive integer",
         gguf=meta({A + "attention.head_count": 0})),
    Case("gguf-head_count-3", r"llama\.embedding_length 64 is not a multiple of llama\.attention\.head_count 3",
         gguf=meta({A + "attention.head_count": 3})),
    Case("gguf-head_count_kv-0", r"llama\.attention\.head_count_kv is 0; expected a positive integer",
         gguf=meta({A + "attention.head_count_kv": 0})),
    Case("gguf-rope_base-nan", r"llama\.rope\.freq_base is nan; expected a finite number above 1",
         gguf=meta({A + "rope.freq_base": float("nan")})),
    Case("gguf-rope_factor-1e30", r"llama\.rope\.scaling\.factor scales the context to 5\.12e\+32 tokens; loom "
                                  r"supports at most 16777216",
         gguf=meta({A + "rope.scaling.type": "linear", A + "rope.scaling.factor": 1e30})),
    Case("gguf-rope_factor-inf", r"llama\.rope\.scaling\.factor is inf; expected a non-negative finite number",
         gguf=meta({A + "rope.scaling.type": "yarn", A + "rope.scaling.factor": Typed(F32, float("inf"))})),
    Case("gguf-alignment-0", r"general\.alignment is 0; expected a positive power of two",
         gguf=meta({"general.alignment": 0})),
    Case("gguf-alignment-48", r"general\.alignment is 48; expected a positive power of two",
         gguf=meta({"general.alignment": 48})),
    # GGUF: a tensor table that lies
    Case("gguf-dims-2^32x2^32", r"\(tensor 'blk\.0\.ffn_down\.weight'\): file is truncated: tensor data of dims "
                                r"\[4294967296, 4294967296\] ends at byte 7378697629\d+, file has \d+",
         gguf=lambda s: s.with_tensor("blk.0.ffn_down.weight", dims=(2**32, 2**32))),
    Case("gguf-n_dims-2^32-1", r"\(tensor 'blk\.0\.attn_q\.weight'\): n_dims is 4294967295; a GGUF tensor has at "
                               r"most 4",
         gguf=lambda s: replace(s.with_tensor("blk.0.attn_q.weight", n_dims=2**32 - 1), sparse_tail=100_000_000)),
    Case("gguf-tensor_count-2^40", r"file is truncated or the tensor count is wrong: 1099511627776 entries of at "
                                   r"least 24 bytes each do not fit",
         gguf=lambda s: replace(s, tensor_count=2**40, sparse_tail=100_000_000)),
    # HF folders
    Case("hf-config-list", r"config\.json: the file holds an array; expected an object of model settings",
         hf={"config": [1, 2]}),
    Case("hf-hidden_size-null", r"config\.json: hidden_size is null; expected a positive integer",
         hf=config(hidden_size=None)),
    Case("hf-rope_scaling-string", r"config\.json: rope_scaling is 'linear'; expected an object \(or null\)",
         hf=config(rope_scaling="linear")),
    Case("hf-heads-0", r"config\.json: num_attention_heads is 0; expected a positive integer",
         hf=config(num_attention_heads=0, head_dim=...)),
    Case("hf-layers-2^31", r"config\.json: num_hidden_layers is 2147483648; expected an integer between 1 and 4096",
         hf=config(num_hidden_layers=2**31)),
    Case("hf-layers-3", r"config\.json: num_hidden_layers is 3, but the file holds tensors for 2 layers",
         hf=config(num_hidden_layers=3)),
    Case("hf-vocab-2^31", r"\(tensor 'model\.embed_tokens\.weight'\): shape \(256, 64\) does not match the "
                          r"config's \(2147483648, 64\)", hf=config(vocab_size=2**31)),
    Case("hf-context-2^32", r"config\.json: max_position_embeddings is 4294967296; expected an integer between 1 "
                            r"and 16777216", hf=config(max_position_embeddings=2**32)),
    Case("hf-rope_theta-nan", r"config\.json: rope_theta is nan; expected a finite number above 1",
         hf=config(rope_theta=float("nan"), rope_parameters=...)),
    Case("hf-index-without-weight_map", r"model\.safetensors\.index\.json: weight_map is null; expected an object "
                                        r"mapping each tensor name to its shard file", hf={"index": {"metadata": {}}}),
]
BY_ID = {case.id: case for case in CASES}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """case id -> the malformed file or folder; "gguf" and "hf": the valid ones they are made from."""
    folder = tmp_path_factory.mktemp("malformed")
    spec = read_spec(tiny_llama_gguf(folder))
    made = {"gguf": write_gguf(str(folder / "valid.gguf"), spec), "hf": str(folder / "hf")}
    for case in CASES:
        if case.gguf is not None:
            made[case.id] = write_gguf(str(folder / f"{case.id}.gguf"), case.gguf(spec))
        else:
            made[case.id] = edited_hf_folder(made["hf"], str(folder / case.id), **case.hf)
    return made


def argv(command: str, path: str) -> list[str]:
    if command == "info":
        return ["info", path]
    return ["generate", "hi", "--model", path, "--max-tokens", "1", "--temperature", "0"]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakGrowth:
    """How far this process's resident size rose above its size at entry while the block ran (sampled)."""

    def __enter__(self) -> PeakGrowth:
        self.base = self.peak = resident_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.growth = self.peak - self.base


def assert_one_line_error(code: int, err: str, path: str, message: str) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"loom: error: {path}"), err
    assert re.search(message, lines[0]), err


def test_the_valid_files_still_load(files, capsys):
    """The files every case is made from load and run: each malformed file differs from them by its one lie."""
    assert main(argv("info", files["gguf"])) == 0
    assert main(argv("generate", files["gguf"])) == 0
    assert main(argv("info", files["hf"])) == 0
    assert load_model(files["hf"]).config.num_layers == 2


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_python_api_raises_a_weights_error(files, case):
    with pytest.raises(WeightsError, match=case.message) as e:
        load_model(files[case.id])
    assert isinstance(e.value, ValueError) and e.value.path.startswith(files[case.id])


@pytest.mark.parametrize("command", ["info", "generate"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_cli_exits_2_with_one_line(files, capsys, case, command):
    path = files[case.id]
    start = time.perf_counter()
    with PeakGrowth() as memory:
        code = main(argv(command, path))
    seconds = time.perf_counter() - start
    assert_one_line_error(code, capsys.readouterr().err, path, case.message)
    assert seconds < SECONDS and memory.growth < RSS_BYTES, (seconds, memory.growth)


def _limit_address_space() -> None:
    """In the child: a 4 GiB address space, so that an allocation sized from a lie fails instead of eating
    the machine (torch starts in far less)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


# `python -m loom.cli ARGS`, then the peak resident size of this process image (VmHWM) written to the file
# named first: the rusage of a child counts the parent's size at fork, VmHWM only what the command used.
_CHILD = """
import runpy, sys
report = sys.argv.pop(1)
try:
    runpy.run_module("loom.cli", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def run_loom(args: list[str], timeout: float = 60) -> tuple[int, str, float, int]:
    """`python -m loom.cli ARGS` in a child: (exit status, stderr, CPU seconds, peak resident bytes)."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as report:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, report.name, *args], stdout=subprocess.DEVNULL,
                                 stderr=err, preexec_fn=_limit_address_space)
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        peak_kib = int(report.read() or 0)
        return child.returncode, err.read().decode(), usage.ru_utime + usage.ru_stime, peak_kib * 1024


@pytest.mark.parametrize("case_id,command", [
    ("gguf-block_count-2^31", "generate"), ("gguf-context-2^27", "generate"), ("gguf-dims-2^32x2^32", "generate"),
    ("gguf-n_dims-2^32-1", "info"), ("hf-layers-2^31", "generate"), ("hf-index-without-weight_map", "info"),
])
def test_the_loom_command(files, case_id, command):
    """The real command: its exit status, its stderr, and its peak resident size and CPU time (torch's
    import included: about 240 MB and 2 s)."""
    path = files[case_id]
    code, err, cpu_seconds, peak = run_loom(argv(command, path))
    assert_one_line_error(code, err, path, BY_ID[case_id].message)
    assert cpu_seconds < SECONDS and 0 < peak < RSS_BYTES, (cpu_seconds, peak)


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=2, qkv_bias=True, attn_out_bias=True, mlp_bias=True),
                                       dict(num_kv_heads=1, head_dim=24, tie_word_embeddings=True)],
                         ids=["mha", "gqa-biases", "mqa-head_dim-tied"])
def test_the_expected_shapes_are_the_models(overrides):
    """The shapes the files are checked against are those of the parameters the model allocates."""
    from loom.weights.hf import hf_tensor_sources

    cfg = ModelConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, **overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())
    sources = hf_tensor_sources(cfg, None)  # type: ignore[arg-type]
    assert set(sources) == set(params)
    for name, param in params.items():
        parts = parameter_part_shapes(cfg, name)
        assert sum(p[0] for p in parts) == param.shape[0] and all(p[1:] == param.shape[1:] for p in parts), name
