"""Losses against direct computations: explicit-logit cross-entropy and hand-written sampled BCE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys import losses
from recsys.losses import full_ce, sampled_bce

N, D, N_ITEMS = 300, 8, 40


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    targets = torch.randint(1, N_ITEMS + 1, (N,), generator=g)
    item_emb = torch.randn(N_ITEMS + 1, D, generator=g, requires_grad=True)
    return hidden, targets, item_emb


@pytest.mark.parametrize("chunk_elements", [1 << 22, 64 * N_ITEMS])  # one chunk; five, the last ragged
def test_full_ce_equals_cross_entropy_without_padding_column(monkeypatch, chunk_elements: int) -> None:
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", chunk_elements)
    hidden, targets, item_emb = make_inputs()
    loss = full_ce(hidden, targets, item_emb)
    grads = torch.autograd.grad(loss * 3.0, (hidden, item_emb))

    logits = hidden @ item_emb.T  # (N, I + 1)
    expected = F.cross_entropy(logits[:, 1:], targets - 1)
    expected_grads = torch.autograd.grad(expected * 3.0, (hidden, item_emb))

    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.all(grads[1][0] == 0)  # the padding row gets no gradient


def test_full_ce_without_grad_gives_the_same_value() -> None:
    hidden, targets, item_emb = make_inputs(1)
    with torch.no_grad():
        value = full_ce(hidden, targets, item_emb)
    torch.testing.assert_close(value, full_ce(hidden, targets, item_emb).detach())


def test_sampled_bce_equals_direct_computation() -> None:
    hidden, targets, item_emb = make_inputs(2)
    k = 5
    loss = sampled_bce(hidden, targets, item_emb, k, generator=torch.Generator().manual_seed(7))

    negatives = torch.randint(1, N_ITEMS + 1, (N, k), generator=torch.Generator().manual_seed(7))
    candidates = torch.cat([targets.unsqueeze(1), negatives], dim=1)  # (N, 1 + K)
    logits = torch.einsum("nd,nkd->nk", hidden, item_emb[candidates])  # (N, 1 + K)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    expected = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1).mean()
    torch.testing.assert_close(loss, expected)


def test_sampled_bce_never_samples_padding() -> None:
    hidden, targets, item_emb = make_inputs(3)
    with torch.no_grad():
        item_emb[0] = float("nan")  # any use of row 0 would poison the loss
    loss = sampled_bce(hidden, targets, item_emb, 50, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
