"""Data module batches, the Lightning system, and train_model on planted synthetic sequences."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest
import pytorch_lightning as L
import torch
import torch.nn.functional as F

from features.schema import SEQUENCES
from features.synthetic import planted_sequences  # noqa: F401  (also imported from here by other tests)
from recsys.config import Config, ConfigError, build_config
from recsys.data import RaggedItems, SequenceDataModule, mask_items, pad_lists
from recsys.evaluation import build_eval_set, evaluate_all
from recsys.losses import sampled_bce, sampled_gbce, sampled_softmax
from recsys.metrics import exclusion_mask, metrics_from_ranks, target_ranks
from recsys.system import SASRecSystem
from recsys.training import train_model

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads that
    wait for each other make these runs many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_sequences(train: list[list[int]], val: list[list[int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_idx": list(range(len(train))), "train_items": train, "val_items": val, "test_items": [[]] * len(train)},
        schema=SEQUENCES,
    )


def small_config(**train: object) -> Config:
    return build_config({
        "model": {"max_len": 16, "hidden": 32, "n_blocks": 1, "n_heads": 1, "dropout": 0.1},
        "train": {"batch_size": 64, "val_batch_size": 256, "lr": 5e-3, "progress": False, "patience": 50, **train},
    })


# --- data module ---------------------------------------------------------------------------------------

TRAIN = [[], [7], [1, 2], [3, 4, 5, 6, 7, 8, 9], [9, 8, 7]]
VAL = [[5], [], [3, 4], [1], []]


def collect_train_rows(dm: SequenceDataModule) -> list[tuple[list[int], list[int]]]:
    rows = []
    for batch in dm.train_dataloader():
        assert batch["inputs"].shape == batch["targets"].shape
        assert batch["inputs"].dtype == torch.long
        for inp, tgt in zip(batch["inputs"].tolist(), batch["targets"].tolist(), strict=True):
            rows.append((inp, tgt))
    return rows


@pytest.mark.parametrize("width", [None, 1, 3, 8])
def test_ragged_pad_matches_pad_lists(width: int | None) -> None:
    rng = random.Random(0)
    lists = [[rng.randint(1, 50) for _ in range(rng.randint(0, 6))] for _ in range(30)]
    ragged = RaggedItems.from_series(pl.Series(lists, dtype=pl.List(pl.Int32)))
    assert torch.equal(ragged.pad(width=width).long(), pad_lists(lists, width))
    rows = torch.tensor([3, 0, 17])
    assert torch.equal(ragged.pad(rows, width).long(), pad_lists([lists[i] for i in rows], width))


def test_train_batches_shift_targets_and_drop_short_users() -> None:
    dm = SequenceDataModule(make_sequences(TRAIN, VAL), n_items=9, max_len=4, batch_size=2, seed=0)
    assert dm.train_users.tolist() == [2, 3, 4]
    assert dm.train_rows.shape == (3, 5)
    rows = collect_train_rows(dm)
    assert len(rows) == 3
    stripped = {tuple(x for x in inp if x): tuple(x for x in tgt if x) for inp, tgt in rows}
    # Last max_len + 1 = 5 items; inputs drop the last, targets drop the first.
    assert stripped == {(1,): (2,), (5, 6, 7, 8): (6, 7, 8, 9), (9, 8): (8, 7)}
    for inp, tgt in rows:
        for t in range(len(inp)):
            assert (tgt[t] == 0) == (inp[t] == 0)  # nothing to predict from padding
            if t + 1 < len(inp) and inp[t]:
                assert tgt[t] == inp[t + 1]


def test_train_order_is_seeded_and_reshuffled_each_epoch() -> None:
    seqs = make_sequences([[1, 2, 3]] * 40, [[4]] * 40)
    loaders = [SequenceDataModule(seqs, 9, 4, batch_size=8, seed=3).train_dataloader() for _ in range(2)]
    epochs = [[torch.cat(list(loader.sampler)) for _ in range(2)] for loader in loaders]  # 2 epochs each
    assert all(len(b) <= 8 for b in loaders[0].sampler) and len(loaders[0]) == 5
    assert sorted(epochs[0][0].tolist()) == list(range(40))
    assert torch.equal(epochs[0][0], epochs[1][0]) and torch.equal(epochs[0][1], epochs[1][1])
    assert not torch.equal(epochs[0][0], epochs[0][1])


def test_val_batches_hold_inputs_full_history_and_targets() -> None:
    dm = SequenceDataModule(make_sequences(TRAIN, VAL), n_items=9, max_len=4, val_batch_size=10)
    (batch,) = list(dm.val_dataloader())
    got = {
        tuple(t for t in tgt if t): (tuple(x for x in inp if x), tuple(h for h in hist if h))
        for inp, hist, tgt in zip(*(batch[k].tolist() for k in ("inputs", "history", "targets")), strict=True)
    }
    assert got == {  # the user with target 5 has no history: left out, as evaluation leaves it out
        (3, 4): ((1, 2), (1, 2)),
        (1,): ((6, 7, 8, 9), (3, 4, 5, 6, 7, 8, 9)),  # history is not truncated to max_len
    }


def test_bad_sequences_are_rejected() -> None:
    seqs = make_sequences(TRAIN, VAL)
    with pytest.raises(ValueError, match="train_items"):
        SequenceDataModule(seqs.with_columns(pl.col("train_items").cast(pl.List(pl.Int64))), 9, 4)
    with pytest.raises(ValueError, match=r"'train_items'.*1\.\.8"):
        SequenceDataModule(seqs, n_items=8, max_len=4)


def test_item_counts_count_all_train_events() -> None:
    dm = SequenceDataModule(make_sequences(TRAIN, VAL), n_items=9, max_len=2)
    assert dm.item_counts.tolist() == [0, 1, 1, 1, 1, 1, 1, 3, 2, 2]


# --- masked-item batches (bidirectional) -------------------------------------------------------------------

MASK = 10  # n_items + 1 for n_items = 9


def test_mask_items_rebuilds_the_last_max_len_items() -> None:
    dm = SequenceDataModule(make_sequences(TRAIN, VAL), n_items=9, max_len=4, batch_size=10)
    (batch,) = list(dm.train_dataloader())
    inputs, targets, _, _ = mask_items(batch["inputs"], batch["targets"], 4, MASK, 0.5, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (3, 4)
    masked = inputs == MASK
    assert bool((targets[masked] != 0).all()) and bool((targets[~masked] == 0).all())
    assert bool(masked.any(1).all())  # at least one masked position per row
    original = torch.where(masked, targets, inputs)  # the unmasked sequence
    assert sorted(tuple(x for x in row if x) for row in original.tolist()) == [(1, 2), (6, 7, 8, 9), (9, 8, 7)]
    assert bool((inputs[original == 0] == 0).all())  # padding is never masked


def test_mask_items_masks_about_mask_prob_of_the_positions() -> None:
    seq = torch.randint(1, 10, (400, 21))
    inputs, targets, _, _ = mask_items(seq[:, :-1], seq[:, 1:], 20, MASK, 0.2, torch.Generator().manual_seed(1))
    rate = (inputs == MASK).float().mean().item()
    assert 0.17 < rate < 0.23
    assert torch.equal(torch.where(inputs == MASK, targets, inputs), seq[:, 1:])
    # With a tiny probability almost every row gets its one forced masked position, at a uniform place.
    inputs, _, _, _ = mask_items(seq[:, :-1], seq[:, 1:], 20, MASK, 1e-6, torch.Generator().manual_seed(2))
    assert (inputs == MASK).sum(1).tolist() == [1] * 400
    assert len(set((inputs == MASK).int().argmax(1).tolist())) == 20


def bidirectional_system(**kwargs: object) -> SASRecSystem:
    torch.manual_seed(0)
    return SASRecSystem(n_items=9, max_len=8, hidden=16, n_blocks=2, n_heads=2, attention="bidirectional",
                        mask_prob=0.3, **kwargs).eval()


def masked_outputs(system: SASRecSystem, seqs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The system's training inputs for raw sequences (B, T) and the model's hidden states on them."""
    torch.manual_seed(seed)
    inputs, targets, _, _ = system._training_inputs({"inputs": seqs[:, :-1], "targets": seqs[:, 1:]})
    return inputs, system.model(inputs)


def test_masked_position_never_sees_its_own_item() -> None:
    system = bidirectional_system()
    seqs = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2, 5], [6, 5, 4, 3, 2, 1, 9, 8, 7]])  # (B, max_len + 1)
    inputs, hidden = masked_outputs(system, seqs, seed=3)
    masked = inputs == MASK
    assert bool(masked.any())
    for row, col in masked.nonzero().tolist():
        changed = seqs.clone()
        changed[row, col + 1] = changed[row, col + 1] % 9 + 1  # a different hidden item (inputs = seqs[:, 1:])
        new_inputs, new_hidden = masked_outputs(system, changed, seed=3)
        assert torch.equal(new_inputs, inputs)  # the item appears nowhere in the input
        torch.testing.assert_close(new_hidden[row, col], hidden[row, col], rtol=0, atol=0)
    # Whereas a visible item on either side changes the output at a masked position.
    row, col = masked.nonzero()[0].tolist()
    for other in (c for c in range(inputs.shape[1]) if not masked[row, c] and inputs[row, c] != 0):
        changed = seqs.clone()
        changed[row, other + 1] = changed[row, other + 1] % 9 + 1
        _, new_hidden = masked_outputs(system, changed, seed=3)
        assert not torch.allclose(new_hidden[row, col], hidden[row, col])


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_bidirectional_loss_is_on_masked_positions_only() -> None:
    system = bidirectional_system()
    seqs = torch.randint(1, 10, (4, 9))
    torch.manual_seed(5)
    inputs, targets, _, _ = system._training_inputs({"inputs": seqs[:, :-1], "targets": seqs[:, 1:]})
    torch.manual_seed(5)
    loss = system._shared_step({"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}, "train")
    hidden = system.model(inputs)
    masked = inputs == MASK
    expected = torch.nn.functional.cross_entropy(system.model.score(hidden[masked])[:, 1:], targets[masked] - 1)
    torch.testing.assert_close(loss, expected)


# --- system ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "loss, attention, sampling",
    [
        ("ce", "causal", "uniform"), ("bce", "causal", "uniform"), ("gbce", "causal", "uniform"),
        ("sampled_softmax", "causal", "uniform"), ("sampled_softmax", "causal", "popularity"),
        ("ce", "bidirectional", "uniform"), ("sampled_softmax", "bidirectional", "popularity"),
    ],
)
def test_fast_dev_run(loss: str, attention: str, sampling: str) -> None:
    L.seed_everything(0)
    dm = SequenceDataModule(planted_sequences(50, 30), n_items=30, max_len=16, batch_size=16)
    system = SASRecSystem(n_items=30, max_len=16, hidden=16, n_blocks=1, loss=loss, n_negatives=3,
                          attention=attention, negative_sampling=sampling)
    trainer = L.Trainer(
        fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(system, datamodule=dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/ndcg_at_10"]) <= float(metrics["val/hr_at_10"]) <= 1.0
    assert system.hparams["loss"] == loss and system.model.attention == attention
    if sampling == "popularity":  # taken from the datamodule's counts at setup
        weights = dm.item_counts.double().clamp(min=1)
        weights[0] = 0
        torch.testing.assert_close(system.sampling_probs, (weights / weights.sum()).float())


def test_from_config_passes_the_loss_and_attention_keys() -> None:
    cfg = build_config({
        "model": {"attention": "bidirectional"},
        "train": {"loss": "sampled_softmax", "n_negatives": 7, "negative_sampling": "popularity", "mask_prob": 0.4},
    })
    system = SASRecSystem.from_config(cfg, n_items=20)
    assert system.model.mask_token == 21
    hp = system.hparams
    assert (hp["loss"], hp["n_negatives"], hp["negative_sampling"], hp["mask_prob"]) == (
        "sampled_softmax", 7, "popularity", 0.4)
    with pytest.raises(ValueError, match="n_negatives"):
        SASRecSystem.from_config(build_config({"train": {"loss": "gbce", "n_negatives": 20}}), n_items=20)


def test_validation_ranks_seen_items_as_evaluate_exclude_seen_says() -> None:
    # The validation metric (early stopping, the best checkpoint) follows evaluate.exclude_seen: against
    # target_ranks with the history excluded or not. User 0's target 2 is ranked below its seen items 1, 3, 4
    # only when they compete.
    user = torch.ones(2, 8)
    history = torch.tensor([[1, 3, 4], [5, 0, 0]])
    targets = torch.tensor([[2], [6]])
    got = {}
    for exclude_seen in (True, False):
        system = SASRecSystem.from_config(build_config({"model": {"hidden": 8, "n_blocks": 1},
                                                        "evaluate": {"exclude_seen": exclude_seen}}), n_items=30)
        assert system.hparams["exclude_seen"] is exclude_seen
        with torch.no_grad():
            system.model.item_emb.weight.copy_(-0.01 * torch.arange(31.0)[:, None].expand(31, 8))  # item i: -0.08 i
            system.model.item_emb.weight[[1, 3, 4]] = 1.0  # user 0's seen items score 8
        scores = system.model.score(user)
        seen = history if exclude_seen else history[:, :0]
        want = metrics_from_ranks(target_ranks(scores, targets, exclusion_mask(seen, 30, keep=targets)), (10,))
        got[exclude_seen] = system._ranking_metrics(user, history, targets)
        assert all(torch.equal(got[exclude_seen][k], want[k]) for k in want), exclude_seen
    assert not torch.equal(got[True]["ndcg_at_10"], got[False]["ndcg_at_10"])


@pytest.mark.parametrize(
    "train, needle",
    [
        ({"loss": "bce", "label_smoothing": 0.1}, "train.label_smoothing applies to train.loss=ce"),
        ({"loss": "gbce", "negative_sampling": "popularity"}, "train.negative_sampling=popularity applies"),
        ({"loss": "focal"}, "train.loss"),
        ({"mask_prob": 1.0}, "train.mask_prob"),
    ],
)
def test_config_rejects_loss_options_that_do_not_apply(train: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_config({"train": train})


def test_popularity_sampling_needs_item_counts() -> None:
    system = SASRecSystem(n_items=9, max_len=4, loss="sampled_softmax", negative_sampling="popularity")
    with pytest.raises(ValueError, match="shape"):
        system.set_item_counts(torch.ones(5))
    system.set_item_counts(torch.tensor([5, 0, 1, 2, 3, 4, 5, 6, 7, 8]))
    assert system.sampling_probs[0] == 0 and system.sampling_probs[1] == system.sampling_probs[2]
    torch.testing.assert_close(system.sampling_probs.sum(), torch.tensor(1.0))


def test_train_model_is_reproducible_on_cpu(tmp_path: Path) -> None:
    seqs, cfg = planted_sequences(120, 40), small_config(max_epochs=2)
    first = train_model(cfg, seqs, 40, tmp_path / "a")
    second = train_model(cfg, seqs, 40, tmp_path / "b")
    assert first.epochs_run == 2 and first.best_epoch in (0, 1)
    assert first.best_checkpoint.is_file() and first.best_checkpoint.parent == tmp_path / "a"
    assert not first.model.training
    assert not (tmp_path / "a" / "lightning_logs").exists()
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.best_val_ndcg == second.best_val_ndcg


def test_train_model_needs_val_items(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_items"):
        train_model(small_config(), make_sequences([[1, 2, 3]], [[]]), 5, tmp_path)


def popularity_ndcg(seqs: pl.DataFrame, n_items: int) -> float:
    """Val NDCG@10 of ranking by train popularity, with the same exclusion and tie rules."""
    counts = torch.bincount(torch.tensor(seqs["train_items"].explode().to_list()), minlength=n_items + 1)
    dm = SequenceDataModule(seqs, n_items, max_len=16, val_batch_size=10_000)
    (batch,) = list(dm.val_dataloader())
    scores = counts.float().expand(len(batch["targets"]), -1)  # (B, I + 1)
    exclude = exclusion_mask(batch["history"], n_items, keep=batch["targets"])
    ranks = target_ranks(scores, batch["targets"], exclude)
    return float(metrics_from_ranks(ranks, (10,))["ndcg_at_10"].mean())


def test_training_learns_a_planted_sequence(tmp_path: Path) -> None:
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=1)
    result = train_model(small_config(max_epochs=3), seqs, n_items, tmp_path)
    baseline = popularity_ndcg(seqs, n_items)
    assert result.best_val_ndcg > 0.5, result
    assert result.best_val_ndcg > baseline + 0.3, (result.best_val_ndcg, baseline)
    # The returned model reproduces the checkpoint's score: the val target is the last train item + 1.
    last = torch.tensor([s[-1] for s in seqs["train_items"].to_list()])
    inputs = torch.tensor([([0] * 16 + s)[-16:] for s in seqs["train_items"].to_list()])
    with torch.no_grad():
        top = result.model.score(result.model.user_vectors(inputs))[:, 1:].argmax(-1) + 1
    assert (top == last % n_items + 1).float().mean() > 0.5


def test_bidirectional_training_learns_a_planted_sequence(tmp_path: Path) -> None:
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=2)
    tree = small_config(max_epochs=4, mask_prob=0.4).to_dict()
    tree["model"]["attention"] = "bidirectional"
    cfg = build_config(tree)
    result = train_model(cfg, seqs, n_items, tmp_path)
    baseline = popularity_ndcg(seqs, n_items)
    assert result.model.mask_token == n_items + 1
    assert result.best_val_ndcg > baseline + 0.3, (result.best_val_ndcg, baseline)


def test_model_ffn_mult_reaches_the_model() -> None:
    cfg = build_config({"model": {"max_len": 8, "hidden": 16, "ffn_mult": 2}})
    model = SASRecSystem.from_config(cfg, 30).model
    assert model.kwargs["ffn_mult"] == 2 and model.blocks[0].ffn[0].out_features == 32


def test_ligr_training_learns_a_planted_sequence(tmp_path: Path) -> None:
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=3)
    tree = small_config(max_epochs=3).to_dict()
    tree["model"].update(block="ligr", ffn_mult=4)
    result = train_model(build_config(tree), seqs, n_items, tmp_path)
    baseline = popularity_ndcg(seqs, n_items)
    assert result.best_val_ndcg > 0.5, result
    assert result.best_val_ndcg > baseline + 0.3, (result.best_val_ndcg, baseline)


def test_model_block_reaches_the_model() -> None:
    cfg = build_config({"model": {"max_len": 8, "hidden": 16, "block": "ligr"}})
    model = SASRecSystem.from_config(cfg, n_items=20).model
    assert model.kwargs["block"] == "ligr" and all(b.gates is not None for b in model.blocks)


# --- repeat bias -----------------------------------------------------------------------------------------


def test_repeat_bias_training_loss_equals_a_per_position_reference() -> None:
    # Oracle: per position t with a target, logits = h_t . E + w[t - s] for every window item s <= t, then the
    # mean cross-entropy; a Python loop over positions.
    torch.manual_seed(0)
    cfg = build_config({"model": {"max_len": 6, "hidden": 8, "n_blocks": 1, "dropout": 0.0, "repeat_bias": True}})
    system = SASRecSystem.from_config(cfg, n_items=9)
    with torch.no_grad():
        system.model.repeat_weight.copy_(torch.tensor([2.0, -1.0, 0.5, 0.25, 1.5, 0.1]))
    inputs = torch.tensor([[0, 0, 3, 5, 3, 7], [1, 2, 1, 2, 1, 2]])
    targets = torch.tensor([[0, 0, 5, 3, 7, 3], [2, 1, 2, 1, 2, 9]])
    loss = system._forward_loss(inputs, targets)
    hidden = system.model(inputs)
    table = system.model.item_embeddings()
    w = system.model.repeat_weight
    terms = []
    for b in range(2):
        for t in range(6):
            if targets[b, t] == 0:
                continue
            logits = hidden[b, t] @ table[1:].T  # (I,)
            extra = torch.zeros(9)
            for s in range(t + 1):
                if inputs[b, s] > 0:
                    extra[inputs[b, s] - 1] += w[t - s]
            terms.append(F.cross_entropy((logits + extra).unsqueeze(0), targets[b, t:t + 1] - 1))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    loss.backward()
    assert system.model.repeat_weight.grad is not None and system.model.repeat_weight.grad.abs().sum() > 0


def test_repeat_bias_trains_in_its_own_optimiser_group_at_a_higher_rate() -> None:
    from types import SimpleNamespace

    from recsys.system import REPEAT_LR_MULT

    cfg = build_config({"model": {"repeat_bias": True}, "train": {"lr": 0.002, "weight_decay": 0.1}})
    system = SASRecSystem.from_config(cfg, n_items=10)
    system._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)  # what the schedule reads
    groups = system.configure_optimizers()["optimizer"].param_groups
    (bias_group,) = [g for g in groups if any(p is system.model.repeat_weight for p in g["params"])]
    assert bias_group["params"] == [system.model.repeat_weight] and bias_group["weight_decay"] == 0.0
    assert bias_group["lr"] == pytest.approx(0.002 * REPEAT_LR_MULT) and REPEAT_LR_MULT > 1
    others = [p for g in groups if g is not bias_group for p in g["params"]]
    assert len(others) == len(list(system.parameters())) - 1  # every other parameter once, at the base rate
    assert all(g["lr"] == pytest.approx(0.002) for g in groups if g is not bias_group)


def test_weight_decay_is_on_matrices_and_embeddings_only() -> None:
    cfg = build_config({"train": {"lr": 0.002, "weight_decay": 0.1}})
    system = SASRecSystem.from_config(cfg, n_items=10)
    from types import SimpleNamespace

    system._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    decayed, kept = system.configure_optimizers()["optimizer"].param_groups
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert decayed["params"] and all(p.dim() >= 2 for p in decayed["params"])
    assert kept["params"] and all(p.dim() < 2 for p in kept["params"])  # biases, LayerNorm gains
    assert len(decayed["params"]) + len(kept["params"]) == len(list(system.parameters()))


LOSS_CASES = {  # train keys → the loss the system must compute, from the losses (each checked on its own
    # against a direct computation in test_losses) or torch, on the gathered positions with a target
    "ce, label smoothing 0.1": ({"loss": "ce", "label_smoothing": 0.1}, lambda h, t, emb, probs: F.cross_entropy(
        h @ emb[1:].T, t - 1, label_smoothing=0.1)),
    "sampled softmax, popularity": ({"loss": "sampled_softmax", "n_negatives": 7, "negative_sampling": "popularity"},
                                    lambda h, t, emb, probs: sampled_softmax(h, t, emb, 7, probs)),
    "sampled softmax, uniform": ({"loss": "sampled_softmax", "n_negatives": 7},
                                 lambda h, t, emb, probs: sampled_softmax(h, t, emb, 7, None)),
    "gbce t 0.75": ({"loss": "gbce", "n_negatives": 5, "gbce_t": 0.75},
                    lambda h, t, emb, probs: sampled_gbce(h, t, emb, 5, 0.75)),
    "bce, 4 negatives": ({"loss": "bce", "n_negatives": 4}, lambda h, t, emb, probs: sampled_bce(h, t, emb, 4)),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_the_training_step_computes_the_configured_loss(case: str) -> None:
    """The train keys reach the loss: a system built from the config computes, on a batch, the loss those keys
    name (popularity negatives drawn from max(count, 1) / sum, with its log-Q; label smoothing; gBCE's t; the
    number of negatives), not another one."""
    keys, reference = LOSS_CASES[case]
    n_items = 30
    system = SASRecSystem.from_config(small_config(**keys), n_items=n_items).eval()  # eval: no dropout
    counts = torch.arange(n_items + 1) ** 2  # item 1 has 1 event, item 30 has 900; entry 0 is padding
    probs = counts.double().clamp(min=1.0)
    probs[0] = 0.0
    probs = probs / probs.sum()
    system.set_item_counts(counts)
    seqs = torch.randint(1, n_items + 1, (6, 17), generator=torch.Generator().manual_seed(3))
    seqs[0, :5] = 0  # a padded row: padding positions carry no loss
    batch = {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}
    torch.manual_seed(11)
    loss = system._shared_step(batch, "train")
    hidden = system.model(batch["inputs"])
    real = batch["targets"] != 0
    torch.manual_seed(11)  # the same negatives
    expected = reference(hidden[real], batch["targets"][real], system.model.item_embeddings(), probs)
    torch.testing.assert_close(loss, expected)


def test_mask_prob_reaches_the_masked_item_batches() -> None:
    system = SASRecSystem.from_config(build_config({"model": {"attention": "bidirectional", "max_len": 50},
                                                    "train": {"mask_prob": 0.45}}), n_items=30)
    seqs = torch.randint(1, 31, (400, 51), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    inputs, _, _, _ = system._training_inputs({"inputs": seqs[:, :-1], "targets": seqs[:, 1:]})
    share = (inputs == system.model.mask_token).float().mean().item()
    assert share == pytest.approx(0.45, abs=0.02)  # 20,000 positions: a standard error of 0.0035


def test_repeat_bias_config_needs_causal_ce_and_dense_evaluation() -> None:
    for extra, needle in (({"model": {"attention": "bidirectional"}}, "model.repeat_bias needs"),
                          ({"train": {"loss": "bce"}}, "model.repeat_bias needs"),
                          ({"evaluate": {"item_block_size": 64, "exclude_seen": False}},
                           "evaluate.item_block_size=null"),
                          ({"train": {"exclude_seen": True}}, "only land on a target that is a repeat")):
        tree = {"model": {"repeat_bias": True, **extra.get("model", {})}, **{k: v for k, v in extra.items()
                                                                           if k != "model"}}
        with pytest.raises(ConfigError, match=needle):
            build_config(tree)
    # with seen items excluded the bias is not scored (below), so item blocks rank as the dense path does
    assert build_config({"model": {"repeat_bias": True}, "evaluate": {"item_block_size": 64}}).model.repeat_bias


def test_repeat_bias_is_not_scored_where_seen_items_are_excluded(tmp_path: Path) -> None:
    """With seen items excluded the ranking keeps only a target that is itself a repeat, so a bonus on window
    items could land on nothing but the target: validation and `recsys evaluate` rank without it (as candidates
    do), and with seen items competing with it."""
    n_items = 50
    seqs = pl.DataFrame({"user_idx": [0, 1], "train_items": [[5, 9, 17, 33, 41], [2, 3, 4, 6, 8]],
                         "val_items": [[17], [4]], "test_items": [[], []]}, schema=SEQUENCES)  # 3 steps back
    val = build_eval_set(seqs, "val", 8)
    ndcg = {}
    for exclude_seen in (True, False):
        cfg = build_config({"model": {"max_len": 8, "hidden": 8, "n_blocks": 1, "repeat_bias": True},
                            "evaluate": {"exclude_seen": exclude_seen, "ks": [10], "baselines": [],
                                         "split": "val"}})
        torch.manual_seed(0)
        system = SASRecSystem.from_config(cfg, n_items=n_items).eval()
        for weight in (0.0, 50.0):
            with torch.no_grad():
                system.model.repeat_weight.zero_()[2] = weight  # the item 3 steps back
                user = system.model.user_vectors(val.inputs)
                val_ndcg = system._ranking_metrics(user, val.history[:], val.targets[:], val.inputs)["ndcg_at_10"]
            evaluated = evaluate_all(system.model, seqs, n_items, None, cfg.evaluate, 8)["model"]["ndcg_at_10"]
            assert float(val_ndcg.mean()) == pytest.approx(evaluated)
            ndcg[exclude_seen, weight] = evaluated
            if exclude_seen:  # item blocks (which never add the bias) rank alike
                blocked = cfg.evaluate.model_copy(update={"item_block_size": 16})
                assert evaluate_all(system.model, seqs, n_items, None, blocked, 8)["model"]["ndcg_at_10"] == \
                    pytest.approx(evaluated)
    assert ndcg[True, 50.0] == ndcg[True, 0.0] < 1.0  # the bonus changes nothing with seen items excluded
    assert ndcg[False, 50.0] == 1.0 > ndcg[False, 0.0]  # and puts the repeated targets first when they compete


def cycling_sequences(n_users: int, n_items: int, seed: int = 0) -> pl.DataFrame:
    """Each user cycles through 3 items of their own (a b c a b c …): the next item is always the one
    consumed 3 steps before, a pure repeat that no item-to-item pattern shared by users predicts."""
    rng = random.Random(seed)
    train, val = [], []
    for _ in range(n_users):
        own, length = rng.sample(range(1, n_items + 1), 3), rng.randint(7, 14)
        items = [own[j % 3] for j in range(length + 1)]
        train.append(items[:-1])
        val.append(items[-1:])
    return pl.DataFrame({"user_idx": list(range(n_users)), "train_items": train, "val_items": val,
                         "test_items": [[]] * n_users}, schema=SEQUENCES)


def test_repeat_bias_learns_a_planted_repeat(tmp_path: Path) -> None:
    n_items = 200
    seqs = cycling_sequences(300, n_items, seed=2)
    results = {}
    for bias in (False, True):
        cfg = build_config({
            "model": {"max_len": 16, "hidden": 16, "n_blocks": 1, "dropout": 0.0, "repeat_bias": bias},
            "train": {"batch_size": 64, "lr": 5e-3, "progress": False, "max_epochs": 8},
            "evaluate": {"exclude_seen": False},  # the target is a seen item: the standard exclusion keeps it
        })
        results[bias] = train_model(cfg, seqs, n_items, tmp_path / str(bias))
    with_bias = results[True]
    assert with_bias.best_val_ndcg > 0.9, with_bias.best_val_ndcg
    assert with_bias.best_val_ndcg > results[False].best_val_ndcg + 0.2, (results[False].best_val_ndcg,)
    # the item 3 steps back (distance 2 from the scored position's own item) is up, the other two are down
    w = with_bias.model.repeat_weight.detach()
    assert w[2] > 0 > max(w[0], w[1]), w


def test_ddp_train_loss_is_the_mean_over_every_process_batches() -> None:
    """Under DDP train/loss was rank 0's own row-weighted mean (its share of the batches only): the logged value
    is the sum of every process's (loss sum, rows), divided once."""
    from types import SimpleNamespace

    system = SASRecSystem.from_config(small_config(), n_items=20)
    logged: dict[str, float] = {}
    system.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    other_rank = torch.tensor([3.0 * 30, 30.0], dtype=torch.float64)  # rank 1: mean loss 3.0 over 30 rows
    reduce = lambda sums, reduce_op: sums + other_rank  # noqa: E731 -- the sum over the 2 processes
    system._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    system.on_train_epoch_start()
    system._loss_sum, system._loss_rows = torch.tensor(1.0 * 10), 10  # rank 0: mean loss 1.0 over 10 rows
    system.on_train_epoch_end()
    assert logged == {"train/loss": pytest.approx((10 + 90) / 40)}
    system._trainer = SimpleNamespace(world_size=1, strategy=None)  # one process: its own mean
    system.on_train_epoch_end()
    assert logged == {"train/loss": pytest.approx(1.0)}


def test_validation_under_bf16_training_is_the_float32_number_the_evaluate_job_reports(tmp_path: Path) -> None:
    """Under bf16-mixed (the GPU default) validation computed the user vectors in bf16 and only ranked in
    float32: the epoch was chosen by a number 2e-5 off the one `recsys evaluate` reports for the same model."""
    from recsys.evaluation import evaluate_scorer, model_scorer

    rng = random.Random(0)
    train, val = [], []
    for _ in range(600):  # a noisy next-item chain over 300 items
        cur, items = rng.randrange(300), []
        for _ in range(rng.randint(6, 20)):
            items.append(cur + 1)
            cur = (cur + 1) % 300 if rng.random() < 0.5 else rng.randrange(300)
        train.append(items[:-1])
        val.append(items[-1:])
    seqs = pl.DataFrame({"user_idx": list(range(600)), "train_items": train, "val_items": val,
                         "test_items": [[]] * 600}, schema=SEQUENCES)
    cfg = build_config({"model": {"max_len": 16, "hidden": 32, "n_blocks": 2, "dropout": 0.1},
                        "train": {"batch_size": 64, "lr": 5e-3, "progress": False, "max_epochs": 3,
                                  "accelerator": "cpu", "precision": "bf16-mixed"}})
    result = train_model(cfg, seqs, 300, tmp_path / "ckpt")
    evaluated = evaluate_scorer(model_scorer(result.model), build_eval_set(seqs, "val", 16), 300, ks=(10,))
    assert result.best_val_ndcg == pytest.approx(evaluated["ndcg_at_10"], abs=1e-7)
