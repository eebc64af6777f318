"""Calibration: capture what each layer sees on sample text, layer by layer, once.

Post-training methods (AWQ, GPTQ, SmoothQuant, Wanda, SparseGPT) need the inputs of every linear
layer on calibration data. ``LayerwiseCalibration`` embeds N samples of L tokens once and walks the
decoder layer by layer: for layer i it runs the samples through the layer, with forward hooks
recording the inputs of the linears asked for; the caller then rewrites the layer (quantizes,
smooths, prunes); the samples then advance through the *rewritten* layer, so layer i + 1 is
calibrated on the outputs of the already-compressed layers before it (GPTQ's sequential scheme).

Samples are random windows of the calibration text (GPTQ's sampling), never the evaluation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 32
    seq_len: int = 512
    seed: int = 0


def calibration_samples(token_ids: list[int], config: CalibrationConfig) -> torch.Tensor:
    """[samples, seq_len] windows starting at random positions of the tokenized calibration text."""
    n = len(token_ids)
    if n <= config.seq_len:
        raise ValueError(f"the calibration text has {n} tokens; it needs more than seq_len = {config.seq_len}")
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, n - config.seq_len, (config.samples,), generator=gen)
    ids = torch.tensor(token_ids, dtype=torch.long)
    return torch.stack([ids[s:s + config.seq_len] for s in starts.tolist()])


class LayerwiseCalibration:
    """Hidden states of the calibration samples at the current layer, and hooks to capture inputs."""

    def __init__(self, model: Transformer, samples: torch.Tensor) -> None:
        self.model = model
        self.layer = 0
        n, seq_len = samples.shape
        positions = torch.arange(seq_len)
        self.meta = AttentionMetadata.uncached([seq_len])
        self.rope = model.rotary.prepare(positions, model.dtype) if model.rotary is not None else None
        with torch.inference_mode():
            self.hidden = [model.embed(samples[i], positions).clone() for i in range(n)]

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def run(self, on_input: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None) -> None:
        """Run the current layer on every sample (outputs discarded), calling ``on_input[m](x)`` with
        the 2-D input of each hooked module ``m``."""
        handles = [m.register_forward_pre_hook(_hook(fn)) for m, fn in (on_input or {}).items()]
        try:
            with torch.inference_mode():
                block = self.model.layers[self.layer]
                for h in self.hidden:
                    block(h, self.meta, None, self.rope)
        finally:
            for handle in handles:
                handle.remove()

    def capture(self, modules: list[nn.Module]) -> list[torch.Tensor]:
        """The inputs of ``modules`` over all samples, each [tokens, in_features]."""
        seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}
        self.run({m: seen[m].append for m in modules})
        return [torch.cat(seen[m]) for m in modules]

    def advance(self) -> None:
        """Push the samples through the current (rewritten) layer and move to the next one."""
        with torch.inference_mode():
            block = self.model.layers[self.layer]
            self.hidden = [block(h, self.meta, None, self.rope) for h in self.hidden]
        self.layer += 1

    def layers(self, desc: str = "layers") -> Iterator[int]:
        """Iterate the layer indices with a progress bar, advancing after each one."""
        for i in tqdm(range(len(self.model.layers)), desc=desc, unit="layer"):
            assert i == self.layer
            yield i
            self.advance()


def _hook(fn: Callable[[torch.Tensor], None]) -> Callable:
    def pre_hook(_module: nn.Module, args: tuple) -> None:
        x = args[0]
        fn(x.reshape(-1, x.shape[-1]).detach().float())

    return pre_hook
