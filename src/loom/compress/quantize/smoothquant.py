"""SmoothQuant (Xiao et al. 2022, arXiv 2211.10438): move activation outliers into the weights, then
run W8A8 (int8 weights per output channel, int8 activations per token, int32 accumulation).

For linears sharing an input X (q|k|v after the attention norm, gate|up after the MLP norm):

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)        X diag(s)^-1 . diag(s) W^T = X W^T

the norm weight is divided by s and the weight columns multiplied by it, so the float model is
unchanged while the activations to quantize have a flatter range. The other linears (o, down) are
quantized to W8A8 without smoothing (their inputs come from attention and the gated product,
which have no norm to fold into). ``alpha=None`` gives naive W8A8 (no smoothing).
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] from the per-channel activation max |X_j| [K] and the weights [N, K] that read X."""
    w_max = w.abs().amax(dim=0).clamp_min(MIN_SCALE)
    s = act_absmax.clamp_min(MIN_SCALE).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(MIN_SCALE)
