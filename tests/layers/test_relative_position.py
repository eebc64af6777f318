"""T5's relative position buckets equal transformers' (Mesh TensorFlow's) for every offset, both directions."""

from __future__ import annotations

import pytest
import torch

from loom.layers.relative_position import RelativePositionBias, relative_position_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (4, 4), (320, 1000)])
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    r = torch.arange(-3 * max_distance, 3 * max_distance + 1)
    want = T5Attention._relative_position_bucket(r, bidirectional, num_buckets, max_distance)
    got = relative_position_bucket(r, bidirectional, num_buckets, max_distance)
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() < num_buckets


def test_bucket_formula_by_hand():
    # T5's defaults: 32 buckets, 128 max distance. Bidirectional: 16 per direction, 8 exact ones.
    r = torch.tensor([0, -1, -7, -8, -127, -128, -5000, 1, 7, 8, 5000])
    assert relative_position_bucket(r, True).tolist() == [0, 1, 7, 8, 15, 15, 15, 17, 23, 24, 31]
    # causal: keys after the query (r > 0) share bucket 0; 32 buckets for r <= 0, 16 exact
    r = torch.tensor([3, 0, -1, -15, -16, -127, -128, -10**6])
    # -16: 16 + floor(ln(16/16) / ln(128/16) * 16) = 16; -127: 16 + floor(ln(127/16) / ln 8 * 16) = 31
    assert relative_position_bucket(r, False).tolist() == [0, 0, 1, 15, 16, 31, 31, 31]


def test_bias_matrix_looks_up_the_table_by_key_minus_query():
    torch.manual_seed(0)
    bias = RelativePositionBias(8, 20, num_heads=3, bidirectional=False)
    bias.weight.data.normal_()
    q, k = torch.tensor([4, 5]), torch.arange(6)
    m = bias.matrix(q, k)
    assert m.shape == (3, 2, 6)
    for i, qi in enumerate(q.tolist()):
        for j in range(6):
            b = relative_position_bucket(torch.tensor(j - qi), False, 8, 20)
            assert torch.equal(m[:, i, j], bias.weight[b])
