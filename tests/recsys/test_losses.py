"""Losses against direct computations: explicit-logit cross-entropy, hand-written sampled softmax, BCE and
gBCE (two forms: the beta-weighted positive term and gSASRec's transformed positive logit)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys import losses
from recsys.losses import full_ce, gbce_beta, sampled_bce, sampled_gbce, sampled_softmax

N, D, N_ITEMS = 300, 8, 40


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    targets = torch.randint(1, N_ITEMS + 1, (N,), generator=g)
    item_emb = torch.randn(N_ITEMS + 1, D, generator=g, requires_grad=True)
    return hidden, targets, item_emb


# One chunk; 5 chunks of 64 rows (the last 44); 43 chunks of 7 rows (the last 6).
@pytest.mark.parametrize("chunk_elements", [1 << 22, 64 * N_ITEMS, 7 * N_ITEMS + 3])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_full_ce_equals_cross_entropy_without_padding_column(
    monkeypatch, chunk_elements: int, label_smoothing: float
) -> None:
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", chunk_elements)
    hidden, targets, item_emb = make_inputs()
    loss = full_ce(hidden, targets, item_emb, label_smoothing)
    grads = torch.autograd.grad(loss * 3.0, (hidden, item_emb))

    logits = hidden @ item_emb.T  # (N, I + 1)
    expected = F.cross_entropy(logits[:, 1:], targets - 1, label_smoothing=label_smoothing)
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


def test_chunked_full_ce_equals_unchunked(monkeypatch) -> None:
    hidden, targets, item_emb = make_inputs(4)
    results = []
    for rows in (N, 64, 7, 1):  # one chunk, then ragged chunks, then one row per chunk
        monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", rows * N_ITEMS)
        loss = full_ce(hidden, targets, item_emb, 0.05)
        results.append((loss, *torch.autograd.grad(loss, (hidden, item_emb))))
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            torch.testing.assert_close(a, b)


def test_full_ce_rejects_bad_label_smoothing() -> None:
    hidden, targets, item_emb = make_inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        full_ce(hidden, targets, item_emb, 1.0)


def reference_sampled_softmax(
    hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, negatives: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Row by row: softmax over [positive, negatives] with logits - log q, hits of the positive dropped."""
    rows = []
    for h, t in zip(hidden, targets, strict=True):
        keep = negatives[negatives != t]
        items = torch.cat([t.view(1), keep])
        logits = item_emb[items] @ h - q[items].log()
        rows.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(rows).mean()


def test_sampled_softmax_uniform_equals_direct_computation() -> None:
    hidden, targets, item_emb = make_inputs(5)
    k = 64
    loss = sampled_softmax(hidden, targets, item_emb, k, generator=torch.Generator().manual_seed(3))
    negatives = torch.randint(1, N_ITEMS + 1, (k,), generator=torch.Generator().manual_seed(3))
    assert bool((negatives.unsqueeze(0) == targets.unsqueeze(1)).any())  # the case has accidental hits
    q = torch.full((N_ITEMS + 1,), 1.0 / N_ITEMS)
    torch.testing.assert_close(loss, reference_sampled_softmax(hidden, targets, item_emb, negatives, q))
    # Uniform log-Q is a constant: the loss is the uncorrected sampled softmax.
    plain = reference_sampled_softmax(hidden, targets, item_emb, negatives, torch.ones(N_ITEMS + 1))
    torch.testing.assert_close(loss, plain)


def test_sampled_softmax_popularity_equals_direct_computation() -> None:
    hidden, targets, item_emb = make_inputs(6)
    k = 32
    counts = torch.arange(N_ITEMS + 1.0) ** 2  # strongly skewed; item 0 (padding) has probability 0
    probs = counts / counts.sum()
    loss = sampled_softmax(hidden, targets, item_emb, k, probs, generator=torch.Generator().manual_seed(9))
    negatives = torch.multinomial(probs, k, replacement=True, generator=torch.Generator().manual_seed(9))
    assert 0 not in negatives.tolist()
    expected = reference_sampled_softmax(hidden, targets, item_emb, negatives, probs)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (hidden, item_emb))
    expected_grads = torch.autograd.grad(expected, (hidden, item_emb))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_sampled_softmax_where_every_negative_is_a_hit_is_zero() -> None:
    hidden, _, item_emb = make_inputs(7)
    targets = torch.ones(N, dtype=torch.long)
    probs = torch.zeros(N_ITEMS + 1)
    probs[1] = 1.0  # only the positive can be drawn
    loss = sampled_softmax(hidden, targets, item_emb, 5, probs)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(grad).all()


def test_gbce_beta_hand_values() -> None:
    # alpha = 1 / (3 - 1) = 0.5; beta = 0.5 * (t * (1 - 2) + 2).
    assert gbce_beta(1, 3, 0.5) == pytest.approx(0.75)
    assert gbce_beta(1, 3, 0.0) == pytest.approx(1.0)  # t = 0: plain BCE
    assert gbce_beta(256, 3417, 1.0) == pytest.approx(256 / 3416)  # t = 1: beta = alpha
    for bad in ((0, 10, 0.5), (10, 10, 0.5), (1, 10, 1.5)):
        with pytest.raises(ValueError):
            gbce_beta(*bad)


def test_sampled_gbce_equals_direct_computation() -> None:
    hidden, targets, item_emb = make_inputs(8)
    k, t = 4, 0.75
    loss = sampled_gbce(hidden, targets, item_emb, k, t, generator=torch.Generator().manual_seed(2))

    negatives = torch.randint(1, N_ITEMS + 1, (N, k), generator=torch.Generator().manual_seed(2))
    alpha = k / (N_ITEMS - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    h, e = hidden.double(), item_emb.double()
    pos = (h * e[targets]).sum(-1)  # (N,)
    neg = torch.einsum("nd,nkd->nk", h, e[negatives])  # (N, K)
    # gSASRec's form: BCE on the logit of sigmoid(s+) ** beta, i.e. -log(sigmoid(s+) ** beta).
    transformed = torch.log(1.0 / (torch.sigmoid(pos) ** -beta - 1.0))  # logit(p ** beta)
    expected = (
        F.binary_cross_entropy_with_logits(transformed, torch.ones(N), reduction="none")
        + F.binary_cross_entropy_with_logits(neg, torch.zeros(N, k, dtype=torch.double), reduction="none").sum(1)
    ).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert not math.isclose(beta, 1.0)


def test_sampled_gbce_with_t_zero_is_sampled_bce() -> None:
    hidden, targets, item_emb = make_inputs(9)
    gbce = sampled_gbce(hidden, targets, item_emb, 3, 0.0, generator=torch.Generator().manual_seed(1))
    bce = sampled_bce(hidden, targets, item_emb, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gbce, bce)


def with_padding(targets: torch.Tensor, seed: int) -> torch.Tensor:
    """``targets`` with about a third of the positions set to 0 (no target), the first one included."""
    pad = torch.rand(len(targets), generator=torch.Generator().manual_seed(seed)) < 0.33
    pad[0] = True
    return targets.masked_fill(pad, 0)


# CPU: one chunk, then ragged chunks of 64 and 7 rows; and the one-matrix path that full_ce takes on GPU.
@pytest.mark.parametrize("path", ["one_chunk", "chunks_of_64", "chunks_of_7", "dense"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_full_ce_over_all_positions_equals_full_ce_on_the_gathered_ones(
    monkeypatch, path: str, label_smoothing: float
) -> None:
    hidden, targets, item_emb = make_inputs(10)
    targets = with_padding(targets, seed=10)
    real = targets != 0

    def all_positions() -> torch.Tensor:
        if path == "dense":
            classes = targets - 1
            return losses._dense_ce(hidden, classes, item_emb[1:], label_smoothing, (classes >= 0).sum(),
                                    (classes >= 0).float())
        rows = {"one_chunk": N, "chunks_of_64": 64, "chunks_of_7": 7}[path]
        monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", rows * N_ITEMS)
        return full_ce(hidden, targets, item_emb, label_smoothing)

    loss = all_positions()
    grads = torch.autograd.grad(loss * 3.0, (hidden, item_emb))
    monkeypatch.undo()
    gathered = full_ce(hidden[real], targets[real], item_emb, label_smoothing)  # the gathered positions only
    want = torch.autograd.grad(gathered * 3.0, (hidden, item_emb))
    reference = F.cross_entropy((hidden @ item_emb.T)[real][:, 1:], targets[real] - 1, label_smoothing=label_smoothing)

    torch.testing.assert_close(loss, gathered)
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)
    assert torch.all(grads[0][~real] == 0)  # positions without a target get no gradient
    assert torch.all(grads[1][0] == 0)  # nor does the padding row


def test_full_ce_with_no_target_at_all_is_zero_not_nan() -> None:
    hidden, _, item_emb = make_inputs(11)
    loss = full_ce(hidden, torch.zeros(N, dtype=torch.long), item_emb)
    assert loss.item() == 0.0
    assert torch.all(torch.autograd.grad(loss, hidden)[0] == 0)


# ---- full CE with an additive bias on some items' logits (the model's repeat bias) ---------------------------


@pytest.mark.parametrize("chunk_elements", [1 << 22, 7 * N_ITEMS + 3])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_full_ce_with_bias_equals_cross_entropy_on_biased_logits(monkeypatch, chunk_elements, label_smoothing):
    # Oracle: the explicit (N, n_items) logits with the values added by a Python loop, F.cross_entropy, autograd.
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", chunk_elements)
    hidden, targets, item_emb = make_inputs(3)
    targets[::9] = 0  # some positions without a target
    g = torch.Generator().manual_seed(4)
    items = torch.randint(0, N_ITEMS + 1, (N, 5), generator=g)  # 0 = padding; repeats within a row happen
    items[:, 0] = items[:, 1]  # at least one repeated item per row
    values = torch.randn(N, 5, generator=g, requires_grad=True)
    got = full_ce(hidden, targets, item_emb, label_smoothing, bias=(items, values))
    got.backward()
    grads = [hidden.grad.clone(), item_emb.grad.clone(), values.grad.clone()]
    for t in (hidden, item_emb, values):
        t.grad = None
    logits = hidden @ item_emb[1:].T  # (N, I)
    extra = torch.zeros_like(logits)
    for n in range(N):
        for j in range(5):
            if items[n, j] > 0:
                extra[n, items[n, j] - 1] = extra[n, items[n, j] - 1] + values[n, j]
    want = F.cross_entropy(logits + extra, targets - 1, ignore_index=-1, label_smoothing=label_smoothing)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for ours, theirs in zip(grads, (hidden.grad, item_emb.grad, values.grad), strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_full_ce_with_zero_bias_is_full_ce() -> None:
    hidden, targets, item_emb = make_inputs(5)
    items = torch.randint(0, N_ITEMS + 1, (N, 4))
    plain = full_ce(hidden, targets, item_emb)
    assert full_ce(hidden, targets, item_emb, bias=(items, torch.zeros(N, 4))).item() == pytest.approx(
        plain.item(), rel=1e-6)


@pytest.mark.parametrize("path", ["dense", "one_chunk", "chunks_of_7", "biased"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_weighted_full_ce_is_the_weighted_mean_of_the_row_losses(monkeypatch, path: str, label_smoothing: float):
    """Row weights (train.type_weights): sum(w * F.cross_entropy(reduction='none')) / sum(w) over the positions
    with a target, values and gradients, on every path; a weight-0 row gets no gradient."""
    hidden, targets, item_emb = make_inputs(11)
    targets = with_padding(targets, seed=11)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(3)) * 3
    weights[::5] = 0.0
    real = targets != 0
    logits = (hidden @ item_emb.T)[:, 1:]
    bias = None
    if path == "biased":  # a zero bias on the repeat-bias path: the same logits
        bias = (targets.unsqueeze(1), torch.zeros(N, 1))
    rows = (real * weights).float()
    per_row = F.cross_entropy(logits, (targets - 1).clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    reference = (per_row * rows).sum() / rows.sum()
    if path == "dense":
        classes = targets - 1
        loss = losses._dense_ce(hidden, classes, item_emb[1:], label_smoothing, rows.sum(), rows)
    else:
        chunk = {"one_chunk": N, "chunks_of_7": 7, "biased": 7}[path]
        monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", chunk * N_ITEMS)
        loss = full_ce(hidden, targets, item_emb, label_smoothing, bias, weights=weights)
    grads = torch.autograd.grad(loss, (hidden, item_emb))
    want = torch.autograd.grad(reference, (hidden, item_emb))
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)
    assert torch.all(grads[0][rows == 0] == 0)
    # all weights 1 is the plain loss; all 0 is a zero loss, not NaN
    torch.testing.assert_close(full_ce(hidden, targets, item_emb, label_smoothing, weights=torch.ones(N)),
                               full_ce(hidden, targets, item_emb, label_smoothing))
    assert float(full_ce(hidden, targets, item_emb, weights=torch.zeros(N)).detach()) == 0.0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_chunked_full_ce_under_cpu_bf16_autocast_is_the_float32_loss_within_bf16_rounding(
    monkeypatch, label_smoothing: float
) -> None:
    """Under autocast the chunked loss casts its operands once and runs its loop in bf16 products with float32
    softmax: the value and both gradients stay within bf16 rounding of the float32 reference, and come back in
    the inputs' dtype (float32), padding row untouched."""
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 7 * N_ITEMS)  # 43 chunks
    hidden, targets, item_emb = make_inputs(3)
    targets = with_padding(targets, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_ce(hidden, targets, item_emb, label_smoothing)
    grads = torch.autograd.grad(loss, (hidden, item_emb))
    real = targets != 0
    reference = F.cross_entropy((hidden @ item_emb.T)[real][:, 1:], targets[real] - 1, label_smoothing=label_smoothing)
    want = torch.autograd.grad(reference, (hidden, item_emb))

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0.0)
    for got, expected in zip(grads, want, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0.0, atol=0.02 * expected.abs().max().item())
    assert torch.all(grads[1][0] == 0)
    assert torch.all(grads[0][~real] == 0)
