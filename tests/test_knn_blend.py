"""benchmarks.knn_blend: the blend is z(model) + alpha * z(knn), per user over the item columns."""

from __future__ import annotations

import torch

from benchmarks.knn_blend import blended, standardised


def test_the_blend_sums_per_row_z_scores_and_keeps_padding_out():
    model = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 5.0, 8.0]])  # (B, I + 1), column 0 = padding
    knn = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    z = standardised(model)
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-6) and torch.allclose(z.std(1), torch.ones(2))
    out = blended(lambda i, u: model, lambda i, u: knn, 2.0)(torch.zeros(2, 1), torch.arange(2))
    assert out.shape == (2, 4) and torch.isinf(out[:, 0]).all()
    assert torch.allclose(out[:, 1:], z + 2.0 * standardised(knn))
    # item 1 of user 0: last by the model, first once kNN weighs in; alpha 0 is the model's order
    assert out[0, 1:].argmax() == 0
    assert blended(lambda i, u: model, lambda i, u: knn, 0.0)(torch.zeros(2, 1), torch.arange(2))[0, 1:].argmax() == 2
