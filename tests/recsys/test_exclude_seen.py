"""train.exclude_seen: a causal position's softmax leaves out the items already seen up to it (never its own
target). The loss against the cross-entropy on each row's logits with the excluded columns deleted, on every
path (dense, one chunk, chunks, biased, bf16 autocast), and the exclusions the training step builds against
the prefixes written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recsys import losses
from recsys import system as system_module
from recsys.config import ConfigError, build_config
from recsys.losses import full_ce
from recsys.system import SASRecSystem
from recsys.training import train_model
from tests.recsys.test_system import planted_sequences, small_config

N, D, N_ITEMS, L = 120, 8, 40, 9


def make_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D), targets (N,) with padding rows, item_emb (I + 1, D), exclude (N, L) with padding,
    repeats and the row's own target mixed in, weights (N,) with zeros."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    item_emb = torch.randn(N_ITEMS + 1, D, generator=g, requires_grad=True)
    targets = torch.randint(1, N_ITEMS + 1, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.15] = 0  # positions without a target
    exclude = torch.randint(1, N_ITEMS + 1, (N, L), generator=g)
    exclude[:, 1] = exclude[:, 0]  # a repeated item
    exclude[::3, 2] = targets[::3]  # the row's own target: never excluded
    exclude[torch.rand(N, L, generator=g) < 0.3] = 0  # padding
    weights = torch.rand(N, generator=g) * 2
    weights[::7] = 0.0
    return hidden, targets, item_emb, exclude, weights


def reference(hidden, targets, item_emb, exclude, smoothing, weights=None) -> torch.Tensor:
    """Row by row: F.cross_entropy over the columns left after deleting the row's excluded items (its target
    kept), label smoothing spread over those columns only; the (weighted) mean over rows with a target."""
    logits = hidden @ item_emb[1:].T  # (N, I)
    total, count = 0.0, 0.0
    for n in range(len(targets)):
        target = int(targets[n])
        if target == 0:
            continue
        gone = {int(i) for i in exclude[n] if int(i) not in (0, target)}
        left = [i for i in range(1, N_ITEMS + 1) if i not in gone]
        row = F.cross_entropy(logits[n, [i - 1 for i in left]].unsqueeze(0), torch.tensor([left.index(target)]),
                              label_smoothing=smoothing)
        w = 1.0 if weights is None else weights[n]
        total, count = total + w * row, count + w
    return total / count


@pytest.mark.parametrize("path", ["dense", "one_chunk", "chunks_of_7", "biased"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_full_ce_with_exclusions_equals_cross_entropy_on_the_columns_left(
    monkeypatch, path: str, label_smoothing: float, weighted: bool
) -> None:
    hidden, targets, item_emb, exclude, weights = make_case(1)
    weights = weights if weighted else None
    want = reference(hidden, targets, item_emb, exclude, label_smoothing, weights)
    if path == "dense":  # the GPU path (one logits matrix), called directly on the CPU
        classes = targets - 1
        rows = (classes >= 0).float() * (1.0 if weights is None else weights)
        loss = losses._dense_ce(hidden, classes, item_emb[1:], label_smoothing, rows.sum(), rows,
                                losses._exclusions(exclude, classes))
    else:
        monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", {"one_chunk": N, "chunks_of_7": 7, "biased": 7}[path] * N_ITEMS)
        bias = (targets.unsqueeze(1), torch.zeros(N, 1)) if path == "biased" else None  # a zero bias: same logits
        loss = full_ce(hidden, targets, item_emb, label_smoothing, bias, weights, exclude=exclude)
    torch.testing.assert_close(loss, want)
    got = torch.autograd.grad(loss, (hidden, item_emb))
    expected = torch.autograd.grad(want, (hidden, item_emb))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_exclusions_change_the_loss_and_nothing_excluded_is_the_plain_loss(label_smoothing: float) -> None:
    hidden, targets, item_emb, exclude, _ = make_case(2)
    plain = full_ce(hidden, targets, item_emb, label_smoothing)
    none = full_ce(hidden, targets, item_emb, label_smoothing, exclude=torch.zeros_like(exclude))
    only_targets = full_ce(hidden, targets, item_emb, label_smoothing, exclude=targets.unsqueeze(1).repeat(1, 3))
    torch.testing.assert_close(none, plain)
    torch.testing.assert_close(only_targets, plain)
    # leaving competitors out can only lower a row's softmax loss (without smoothing)
    if label_smoothing == 0.0:
        assert float(full_ce(hidden, targets, item_emb, exclude=exclude).detach()) < float(plain.detach()) - 1e-3


def test_chunked_exclusions_under_cpu_bf16_autocast_stay_within_bf16_rounding(monkeypatch) -> None:
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 7 * N_ITEMS)
    hidden, targets, item_emb, exclude, _ = make_case(3)
    want = reference(hidden, targets, item_emb, exclude, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_ce(hidden, targets, item_emb, 0.2, exclude=exclude)
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=0.0)
    got = torch.autograd.grad(loss, (hidden, item_emb))
    expected = torch.autograd.grad(want, (hidden, item_emb))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0.0, atol=0.02 * e.abs().max().item())


def left_padded(rows: int, width: int, seed: int, n_items: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    items = torch.randint(1, n_items + 1, (rows, width), generator=g)
    real = torch.arange(width).unsqueeze(0) >= width - lengths.unsqueeze(1)
    return items.masked_fill(~real, 0)


@pytest.mark.parametrize("item_drop", [0.0, 0.5])
def test_training_step_excludes_each_positions_prefix_of_the_batch_inputs(monkeypatch, item_drop: float) -> None:
    """The exclusions handed to full_ce: position t of row b leaves out inputs[b, :t + 1] (the batch's inputs,
    before item_drop hides some from the model), one row per position with a target."""
    n_items = 25
    cfg = build_config({"train": {"exclude_seen": True, "item_drop": item_drop}})
    system = SASRecSystem.from_config(cfg, n_items=n_items)
    inputs = left_padded(6, 8, seed=4, n_items=n_items)
    targets = torch.roll(inputs, -1, 1)
    targets[:, -1] = torch.randint(1, n_items + 1, (6,), generator=torch.Generator().manual_seed(5))
    targets[inputs == 0] = 0
    seen: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        seen.append(args[6])
        return losses.full_ce(*args, **kwargs)

    monkeypatch.setattr(system_module, "full_ce", spy)
    system._shared_step({"inputs": inputs, "targets": targets}, "train")
    want = [[int(i) for i in inputs[b, :t + 1]] for b in range(6) for t in range(8) if targets[b, t] != 0]
    got = [[int(i) for i in row] for row in seen[0]]
    assert [sorted(i for i in row if i) for row in got] == [sorted(i for i in row if i) for row in want]

    plain = SASRecSystem.from_config(build_config({}), n_items=n_items)
    seen.clear()
    plain._shared_step({"inputs": inputs, "targets": targets}, "train")
    assert seen == [None]


def test_exclude_seen_is_rejected_where_it_does_not_apply() -> None:
    with pytest.raises(ConfigError, match="evaluate.exclude_seen=false ranks them"):
        build_config({"train": {"exclude_seen": True}, "evaluate": {"exclude_seen": False}})
    with pytest.raises(ConfigError, match="train.exclude_seen needs train.loss=ce and model.attention=causal"):
        build_config({"train": {"exclude_seen": True}, "model": {"attention": "bidirectional"}})
    with pytest.raises(ConfigError, match="train.exclude_seen needs"):
        build_config({"train": {"exclude_seen": True, "loss": "bce"}})
    with pytest.raises(ValueError, match="train.exclude_seen needs"):
        SASRecSystem(n_items=10, max_len=5, loss="gbce", n_negatives=2, train_exclude_seen=True)
    with pytest.raises(ConfigError, match="evaluate.baselines lists repeat with evaluate.exclude_seen=true"):
        build_config({"evaluate": {"baselines": ["popularity", "repeat"]}})
    assert build_config({"evaluate": {"baselines": ["repeat"], "exclude_seen": False}}).evaluate.baselines == (
        "repeat",)


def test_training_with_exclude_seen_learns_a_planted_sequence(tmp_path: Path) -> None:
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=1)
    result = train_model(small_config(max_epochs=3, exclude_seen=True), seqs, n_items, tmp_path)
    assert result.best_val_ndcg > 0.5, result
