"""loom's torch dequantizers equal the gguf package's reference ones, bit for bit, for every type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType as Q

from loom.weights.dequant import DEQUANTIZERS, dequantize
from tests.helpers import random_k_quant

QUANTIZABLE = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]  # gguf can make these from floats
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]  # gguf only reads these: feed random blocks


def check(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> None:
    want = quants.dequantize(raw, qtype).reshape(shape)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, shape).numpy()
    np.testing.assert_array_equal(got, want)  # exact, NaN-aware


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_matches_gguf_on_quantized_weights(qtype):
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((48, 256)) * 0.02).astype(np.float32)
    w[3, :40] = 0.0  # an all-zero block
    w[5, 7] = 1.5  # an outlier
    check(quants.quantize(w, qtype), qtype, w.shape)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_matches_gguf_on_random_k_quant_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_k_quant(qtype.name, 96, rng)
    check(raw.reshape(12, -1), qtype, (12, 8 * 256))


def test_f32_passthrough_and_unsupported():
    w = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    got = dequantize(torch.from_numpy(w.view(np.uint8).copy()), Q.F32, (4, 32))
    np.testing.assert_array_equal(got.numpy(), w)
    assert Q.IQ2_XXS not in DEQUANTIZERS
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,))
