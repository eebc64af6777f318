"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize one column at a time and let the columns
not yet quantized absorb the error, weighted by the inverse Hessian of the layer's squared error.

For a linear layer with calibration inputs X (rows = tokens), the loss ||X W^T - X W_hat^T||^2 has
Hessian H = 2/n X^T X (per output row, the same for all rows). With H^-1 = U^T U (U upper Cholesky):

    for each column i:  q_i = Q(w_i);  e = (w_i - q_i) / U_ii;  w_j -= e U_ij  for j > i

done in blocks of 128 columns whose updates to later columns are applied lazily, once per block.
Group-wise grids are fitted on the already-updated columns when their group starts. Act-order
sorts columns by diag(H), largest first; its grids are then "static" (fitted on the original
weights, group by group) so every group keeps one scale. Dead inputs (diag(H) = 0) are zeroed;
dampening adds 1% of mean(diag H) to the diagonal, and more if Cholesky fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.compress.quantize.rtn import QuantConfig, grid
from loom.layers.quantized import QuantizedTensor


@dataclass(frozen=True)
class GPTQConfig:
    """``act_order`` is on by default: on SmolLM2 (a few input channels carry most of the activation
    energy, the "massive activations" of Llama-family models) plain-order GPTQ at 4-bit g32 was no
    better than RTN on some layers, while act-order halved the layer output error."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True


class Hessian:
    """Running H = 2/n sum_x x x^T over calibration tokens (fp64 accumulation)."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.h.addmm_(x.t(), x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.h * (2.0 / max(self.n, 1))


def neutralize_dead_inputs(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp64 copy of H whose dead inputs (diag H = 0) have their diagonal set to 1, so that it factors,
    and the mask of those inputs (their weight columns are to be zeroed: they only ever see zeros)."""
    H = hessian.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1, raising damp until it factors."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(8):
        l, info = torch.linalg.cholesky_ex(h + damp * (10 ** attempt) * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    raise torch.linalg.LinAlgError("GPTQ: the Hessian is not positive definite even with heavy dampening")


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, qconfig: QuantConfig,
                  config: GPTQConfig = GPTQConfig()) -> QuantizedTensor:
    """GPTQ codes of ``w`` [N, K] given H [K, K] (see module doc)."""
    n, k = w.shape
    g = qconfig.group_for(k)
    groups = k // g
    H, dead = neutralize_dead_inputs(hessian)
    W = w.double().clone()
    W[:, dead] = 0.0

    scales = torch.empty(n, groups, dtype=torch.float64)
    zeros = torch.empty(n, groups, dtype=torch.float64)
    static = config.act_order  # act-order: grids fitted up front on the original weights
    if static or g == k:
        for j in range(groups):
            s, z = grid(W[:, j * g:(j + 1) * g], qconfig)
            scales[:, j], zeros[:, j] = s.double(), z.double()

    perm = torch.argsort(torch.diagonal(H), descending=True) if config.act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, config.damp)
    codes = torch.empty(n, k, dtype=torch.float64)
    qmax = 2 ** qconfig.bits - 1

    for b0 in range(0, k, config.block_size):
        b1 = min(b0 + config.block_size, k)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            orig = int(perm[col])
            j = orig // g
            if not static and g != k and orig % g == 0:
                # fit this group's grid on its columns as they are now (updated by earlier errors)
                cols = W[:, col:col + g].clone()
                inside = min(col + g, b1) - col
                cols[:, :inside] = W1[:, i:i + inside]
                s, z = grid(cols.float(), qconfig)
                scales[:, j], zeros[:, j] = s.double(), z.double()
            s, z = scales[:, j], zeros[:, j]
            w_col = W1[:, i]
            q = torch.clamp(torch.round(w_col / s) + z, 0, qmax)
            codes[:, col] = q
            w_hat = q * s - z * s
            err = (w_col - w_hat) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err[:, i] = err
        W[:, b1:] -= Err @ U[b0:b1, b1:]

    inverse = torch.argsort(perm)
    codes = codes[:, inverse]
    return QuantizedTensor(codes.to(torch.uint8), scales.float(), (-zeros * scales).float(), qconfig.bits, g)


def layer_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||_F^2 / ||X W^T||_F^2: the error GPTQ and AWQ minimize, relative."""
    ref = x @ w.t()
    return float((x @ w_hat.t() - ref).pow(2).sum() / ref.pow(2).sum())

