"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): prune one column at a time and let the columns
not yet visited absorb the error, exactly as GPTQ does for rounding (``quantize/gptq.py``).

For a linear layer with calibration inputs X, the loss ||X W^T - X W_hat^T||^2 has Hessian
H = 2/n X^T X (shared by all rows). With U the upper Cholesky factor of (H + damp I)^-1
(damp = 1% of mean(diag H)), the sweep over columns i, in blocks of B_s = 128, is

    at a block's start (unstructured):   prune the s fraction of the block's weights with the smallest
                                         w_ri^2 / U_ii^2    (the OBS saliency, one threshold per block)
    at an M-column group's start (N:M):  prune the N weights of each row with the smallest w_ri^2 / U_ii^2
    for each column i:                   w_hat = 0 where pruned, else w (or Q(w): joint quantization)
                                         e = (w_i - w_hat_i) / U_ii;   w_j -= e U_ij  for j > i

the updates to columns beyond the block being applied lazily, once per block. The mask is chosen
adaptively: on the weights as earlier columns' errors have already changed them.

Joint sparsification and quantization (section 3.5 of the paper): each column is quantized right after
being masked, inside the same sweep, so the error the later columns absorb is that of pruning and
rounding together. A group's grid (``rtn.grid``) is fitted when the sweep reaches the group, on its
current weights with the already pruned ones at zero. Pruned weights stay exactly zero: the
asymmetric grid's zero point is an integer, so 0 maps to a code that dequantizes to
q s + offset = z s - z s = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.compress.prune.masks import NMPattern, PruningError, Target, check_target, layer_mask, nm_mask
from loom.compress.quantize.gptq import inverse_cholesky, neutralize_dead_inputs
from loom.compress.quantize.rtn import QuantConfig, grid, quantize_groups
from loom.layers.quantized import QuantizedTensor


@dataclass(frozen=True)
class SparseGPTConfig:
    block_size: int = 128  # B_s: columns per lazy batch and per unstructured mask selection
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal


@dataclass
class PrunedWeight:
    """A pruned weight [N, K]: dense with zeros (the dequantized weight when quantized), which positions
    were pruned, and the codes when quantized."""

    weight: torch.Tensor
    mask: torch.Tensor  # bool, True = pruned
    quantized: QuantizedTensor | None = None


class _ColumnQuantizer:
    """Codes of one input column at a time, each group's grid fitted when the sweep reaches its first column.
    Works on the sweep's transposed weight Wt [K, N] (input columns as rows)."""

    def __init__(self, config: QuantConfig, rows: int, in_features: int) -> None:
        self.config = config
        self.group = config.group_for(in_features)
        groups = in_features // self.group
        self.scales = torch.empty(rows, groups)
        self.zeros = torch.empty(rows, groups)
        self.codes = torch.empty(rows, in_features, dtype=torch.uint8)

    def __call__(self, Wt: torch.Tensor, pruned: torch.Tensor, col: int, w: torch.Tensor) -> torch.Tensor:
        """w_hat of input column ``col`` whose target (pruned entries at 0) is ``w``; ``Wt`` as updated so far."""
        j = col // self.group
        if col % self.group == 0:
            cols = slice(col, col + self.group)
            self.scales[:, j], self.zeros[:, j] = grid(Wt[cols].masked_fill(pruned[cols], 0.0).t(), self.config)
        s, z = self.scales[:, j], self.zeros[:, j]
        q = quantize_groups(w[:, None], s, z, self.config.bits)[:, 0]
        self.codes[:, col] = q.to(torch.uint8)
        return (q * s + (-z * s)).double()  # the stored form's fp32 arithmetic: QuantizedTensor.dequantize

    def tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scales, -self.zeros * self.scales, self.config.bits, self.group)


def _saliency(w: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """w_ri^2 / U_ii^2, the loss increase of removing w_ri (OBS), for input columns as rows [cols, N]."""
    return w.pow(2) / u_diag.pow(2)[:, None]


class SparseGPT:
    """The inverse-Hessian factor U of one layer input's H, shared by every projection reading that input."""

    def __init__(self, hessian: torch.Tensor, config: SparseGPTConfig = SparseGPTConfig()) -> None:
        H, self.dead = neutralize_dead_inputs(hessian)
        self.U = inverse_cholesky(H, config.damp)
        self.config = config

    def prune(self, w: torch.Tensor, target: Target, quant: QuantConfig | None = None) -> PrunedWeight:
        """Prune ``w`` [N, K] to ``target`` (and quantize it jointly if ``quant``); see the module doc.

        The sweep runs on Wt = W^T, so that each input column is a contiguous row."""
        n, k = w.shape
        check_target(target, k)
        pattern = target if isinstance(target, NMPattern) else None
        size = self.config.block_size
        if pattern is not None and size % pattern.m:
            raise PruningError(f"SparseGPT block size {size} is not a multiple of M = {pattern.m}")
        U = self.U
        Wt = w.t().double().contiguous()
        Wt[self.dead] = 0.0
        pruned = torch.zeros(k, n, dtype=torch.bool)
        quantizer = _ColumnQuantizer(quant, n, k) if quant is not None else None

        for b0 in range(0, k, size):
            b1 = min(b0 + size, k)
            block, u = Wt[b0:b1], U[b0:b1, b0:b1]  # block is a view: the sweep updates Wt in place
            d = torch.diagonal(u)
            if pattern is None:
                pruned[b0:b1] = layer_mask(_saliency(block, d), float(target))
            err = torch.empty_like(block)
            for i in range(b1 - b0):
                col = b0 + i
                if pattern is not None and i % pattern.m == 0:
                    group = slice(i, i + pattern.m)
                    pruned[col:col + pattern.m] = nm_mask(_saliency(block[group], d[group]).t(), pattern).t()
                w_hat = block[i].masked_fill(pruned[col], 0.0)
                if quantizer is not None:
                    w_hat = quantizer(Wt, pruned, col, w_hat)
                torch.div(block[i] - w_hat, u[i, i], out=err[i])
                block[i:].addr_(u[i, i:], err[i], alpha=-1.0)  # w_j -= e U_ij, j >= i in the block
                block[i] = w_hat  # exactly: zeros stay zeros, codes stay on the grid
            Wt[b1:].addmm_(U[b0:b1, b1:].t(), err, alpha=-1.0)  # the lazy update of the later blocks

        return PrunedWeight(Wt.t().float().contiguous(), pruned.t().contiguous(),
                            None if quantizer is None else quantizer.tensor())


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, target: Target,
                    config: SparseGPTConfig = SparseGPTConfig(), quant: QuantConfig | None = None) -> PrunedWeight:
    """Prune ``w`` [N, K] to ``target`` given H [K, K] (and quantize it jointly if ``quant``); see the module doc."""
    return SparseGPT(hessian, config).prune(w, target, quant)
