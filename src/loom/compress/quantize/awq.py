"""AWQ (Lin et al. 2023, arXiv 2306.00978): protect the weights that meet large activations by
scaling them up before quantization and the activations down by the same factor.

For linears sharing an input x (q|k|v after the attention norm; gate|up after the MLP norm; down
after silu(gate) * up), with x_bar = mean |x| per input channel:

    for r in {0, 1/20, ..., 19/20}:   s = x_bar^r,  s /= sqrt(max s * min s)
        W' = Q(W diag(s)) diag(s)^-1        keep the s whose outputs x W'^T are closest to x W^T

The chosen s is folded into the operation that produces x (norm weight / s, or the up rows / s)
and into W (columns * s), which leaves the float model unchanged. Then a clipping search per
(output row, group) shrinks the grid's range by (1 - i/20), i < 10, keeping the shrink with the
least output error of that group; q and k are not clipped (their errors are amplified by the
softmax, as the paper's code notes). The out projection is scaled only when the value projection
has as many rows as it has inputs (no GQA), as the paper's code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.compress.quantize.rtn import QuantConfig, fake_quantize


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    search_tokens: int = 2048  # calibration tokens used by the scale search
    clip_tokens: int = 512  # ... and by the clipping search


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
    return x[idx]


@torch.no_grad()
def search_scales(x: torch.Tensor, w: torch.Tensor, qconfig: QuantConfig, config: AWQConfig = AWQConfig()
                  ) -> torch.Tensor:
    """The per-input-channel scale s [K] minimizing ||x W^T - x (Q(W s) / s)^T||^2 over the grid of ratios.
    ``w`` [N, K] holds every linear that reads ``x`` (rows concatenated)."""
    x = _subsample(x.float(), config.search_tokens)
    w = w.float()
    x_bar = x.abs().mean(dim=0)
    best, best_s = float("inf"), torch.ones_like(x_bar)
    for r in range(config.grid):
        s = x_bar.pow(r / config.grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        w_q = fake_quantize(w * s[None, :], qconfig) / s[None, :]
        loss = float((x @ (w_q - w).t()).square().mean())  # x W_q^T - x W^T, in one product
        if loss < best:
            best, best_s = loss, s
    return best_s


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, qconfig: QuantConfig, config: AWQConfig = AWQConfig(),
                skip_rows: int = 0) -> torch.Tensor:
    """Per (row, group) range factor [N, K / group] in (0, 1] minimizing that group's output error
    ||x_g w_g^T - x_g Q(w_g)^T||^2; the first ``skip_rows`` rows keep 1 (no clipping)."""
    n, k = w.shape
    g = qconfig.group_for(k)
    groups = k // g
    x = _subsample(x.float(), config.clip_tokens)
    xg = x.reshape(-1, groups, g).transpose(0, 1).contiguous()  # [G, T, g]
    w = w.float()
    best_err = torch.full((n, groups), float("inf"))
    best = torch.ones(n, groups)
    for i in range(int(config.max_shrink * config.grid)):
        shrink = 1.0 - i / config.grid
        factor = torch.full((n, groups), shrink)
        dw = (w - fake_quantize(w, qconfig, factor)).reshape(n, groups, g).permute(1, 2, 0)  # [G, g, N]
        err = torch.bmm(xg, dw).square().mean(dim=1).t()  # group j's output error per row: [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, factor, best)
    best[:skip_rows] = 1.0
    return best
