"""Random weights for tests and experiments, the same for every model family."""

from __future__ import annotations

import torch


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """In place: every parameter normal(0, std), except norms (weights 1, biases 0). Drawn on the CPU from
    one seeded generator, in parameter order, so the same seed gives the same weights on every device."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name:
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
