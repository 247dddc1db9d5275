"""Event types in the model (model.event_types): the exact input embedding, the [MASK] position, batches whose
types stay aligned with their items, warm starts matched by type name, and a planted task that only the types
can solve."""

from __future__ import annotations

import random

import polars as pl
import pytest
import torch

from features.schema import SEQUENCE_TYPES, SEQUENCES
from recsys.candidates import TrainedModel
from recsys.config import build_config
from recsys.data import SequenceDataModule, mask_items
from recsys.model import PAD, SASRec, load_model, save_model
from recsys.training import train_model
from recsys.warmstart import WarmStart

N_ITEMS, MAX_LEN, N_TYPES = 9, 6, 3


def _model(attention: str = "causal", n_event_types: int = N_TYPES, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(n_items=N_ITEMS, max_len=MAX_LEN, hidden=8, n_blocks=2, n_heads=2, dropout=0.0,
                  attention=attention, n_event_types=n_event_types).eval()


def _by_hand(model: SASRec, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """The encoder written out: item row + right-aligned position row + type row, padding zeroed, the blocks."""
    t = items.shape[1]
    keep = items != PAD
    pos = model.pos_emb.weight[MAX_LEN - t:]  # (T, D)
    assert model.type_emb is not None
    x = (model.item_emb.weight[items] + pos + model.type_emb.weight[types]) * keep.unsqueeze(-1)
    mask = model._attention_mask(keep)
    for block in model.blocks:
        x = block(x, mask)
    return model.norm(x)


ITEMS = torch.tensor([[0, 0, 3, 1, 4, 1], [2, 7, 1, 8, 2, 8], [0, 0, 0, 0, 0, 5]])
TYPES = torch.tensor([[0, 0, 1, 2, 2, 3], [3, 1, 1, 1, 2, 1], [0, 0, 0, 0, 0, 2]])


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_each_position_adds_its_events_type_row(attention):
    model = _model(attention)
    with torch.no_grad():
        torch.testing.assert_close(model(ITEMS, TYPES), _by_hand(model, ITEMS, TYPES))
        assert torch.equal(model.type_emb.weight[PAD], torch.zeros(8))  # type 0 adds nothing
        assert not torch.allclose(model(ITEMS, TYPES), model(ITEMS, torch.zeros_like(TYPES)))


def test_type_zero_is_a_model_without_types():
    """All types 0 (none) gives exactly what the same weights give without a type table."""
    typed, plain = _model(), _model(n_event_types=0)
    plain.load_state_dict({k: v for k, v in typed.state_dict().items() if k != "type_emb.weight"})
    with torch.no_grad():
        assert torch.equal(typed(ITEMS, torch.zeros_like(ITEMS)), plain(ITEMS))
        assert torch.equal(typed.user_vectors(ITEMS, torch.zeros_like(ITEMS)), plain.user_vectors(ITEMS))
        assert torch.equal(plain(ITEMS, TYPES), plain(ITEMS))  # a model without types ignores them


def test_a_typed_model_refuses_missing_or_misshapen_types():
    model = _model()
    with pytest.raises(ValueError, match="event types"):
        model(ITEMS)
    with pytest.raises(ValueError, match="event types"):
        model.user_vectors(ITEMS, TYPES[:, 1:])


def test_bidirectional_user_vector_reads_a_typeless_mask_after_the_history():
    model = _model("bidirectional")
    mask = torch.full((3, 1), model.mask_token)
    with torch.no_grad():
        want = model(torch.cat([ITEMS, mask], 1)[:, -MAX_LEN:],
                     torch.cat([TYPES, torch.zeros(3, 1, dtype=torch.long)], 1)[:, -MAX_LEN:])[:, -1]
        torch.testing.assert_close(model.user_vectors(ITEMS, TYPES), want)
        torch.testing.assert_close(model.scores(ITEMS, TYPES), model.score(want))


def test_masked_positions_hide_their_type():
    seq = torch.randint(1, N_ITEMS + 1, (64, 11))
    seq[:5, :4] = PAD
    kinds = (seq % N_TYPES + 1) * (seq != PAD)
    inputs, targets, types, target_types = mask_items(seq[:, :-1], seq[:, 1:], 8, N_ITEMS + 1, 0.3,
                                                      torch.Generator().manual_seed(0),
                                                      types=(kinds[:, :-1], kinds[:, 1:]))
    masked = inputs == N_ITEMS + 1
    assert masked.any(1).all()
    assert torch.equal(types[masked], torch.zeros(int(masked.sum()), dtype=torch.long))
    shown = ~masked
    assert torch.equal(types[shown], ((inputs % N_TYPES + 1) * (inputs != PAD))[shown])  # aligned with the items
    assert torch.equal(targets[masked], seq[:, -8:][masked])
    # the hidden events' types, where the targets are (for train.type_weights), and 0 elsewhere
    assert torch.equal(target_types, ((targets % N_TYPES + 1) * (targets != PAD)))


def _sequences(n_users: int, seed: int, kind=lambda item: item % N_TYPES + 1) -> pl.DataFrame:
    """Random histories whose every event's type is ``kind(item)``, so alignment is checkable anywhere."""
    rng = random.Random(seed)
    rows = []
    for user in range(n_users):
        lists = [[rng.randint(1, N_ITEMS) for _ in range(rng.randint(lo, hi))] for lo, hi in ((0, 15), (0, 2), (0, 1))]
        rows.append((user, *lists, *[[kind(i) for i in x] for x in lists]))
    return pl.DataFrame(rows, schema=SEQUENCES | SEQUENCE_TYPES, orient="row")


@pytest.mark.parametrize("stride,static", [(None, False), (2, False), (3, True)])
def test_batches_carry_each_items_type(stride, static):
    data = SequenceDataModule(_sequences(60, 1), N_ITEMS, MAX_LEN, batch_size=7, val_batch_size=5,
                              window_stride=stride, static_shapes=static, n_event_types=N_TYPES)

    def expect(items: torch.Tensor) -> torch.Tensor:
        return (items % N_TYPES + 1) * (items != PAD)

    n_train = 0
    for batch in data.train_dataloader():
        assert batch["input_types"].shape == batch["inputs"].shape
        assert torch.equal(batch["input_types"], expect(batch["inputs"]))
        # target_types: the type of the next event (also where its item is no target: after padding)
        assert torch.equal(batch["target_types"][batch["targets"] != PAD], expect(batch["targets"])[batch["targets"] != PAD])
        n_train += len(batch["inputs"])
    assert n_train == len(data.train_rows)
    for batch in data.val_dataloader():
        assert torch.equal(batch["input_types"], expect(batch["inputs"]))


def test_types_out_of_range_or_misaligned_are_refused():
    seqs = _sequences(20, 2)
    with pytest.raises(ValueError, match="train_types.*expected 0..2"):
        SequenceDataModule(seqs, N_ITEMS, MAX_LEN, n_event_types=2)
    shifted = seqs.with_columns(pl.col("train_types").list.slice(1))
    with pytest.raises(ValueError, match="one type per item"):
        SequenceDataModule(shifted, N_ITEMS, MAX_LEN, n_event_types=N_TYPES)
    with pytest.raises(ValueError, match="train_types"):
        SequenceDataModule(seqs.drop("train_types"), N_ITEMS, MAX_LEN, n_event_types=N_TYPES)


def test_saved_model_keeps_its_type_table(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.n_event_types == N_TYPES
    with torch.no_grad():
        assert torch.equal(loaded.scores(ITEMS, TYPES), model.scores(ITEMS, TYPES))


def _types(names: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"event_type": names, "type_idx": list(range(1, len(names) + 1)), "n_events": [1] * len(names)},
                        schema={"event_type": pl.String, "type_idx": pl.Int16, "n_events": pl.Int64})


def _item_map(n: int) -> pl.DataFrame:
    return pl.DataFrame({"item_id": [10 * i for i in range(1, n + 1)], "item_idx": list(range(1, n + 1)),
                         "train_count": [1] * n}, schema={"item_id": pl.Int64, "item_idx": pl.Int32,
                                                          "train_count": pl.Int64})


def test_warm_start_matches_event_types_by_name():
    old = _model(seed=0)  # types 1..3 = buy, click, view
    items = _item_map(N_ITEMS)
    users = items.select("item_id", pl.col("item_idx").alias("user_idx"))
    source = TrainedModel(old, users, items, event_types=_types(["buy", "click", "view"]))
    new = _model(n_event_types=3, seed=1)  # tonight: cart is new, click is gone
    fresh_cart = new.type_emb.weight[2].detach().clone()
    report = WarmStart(source, "old", items, event_types=_types(["buy", "cart", "view"])).apply(new)
    assert (report["event_types_from_source"], report["event_types_new"]) == (2, 1)
    torch.testing.assert_close(new.type_emb.weight[1], old.type_emb.weight[1])  # buy
    torch.testing.assert_close(new.type_emb.weight[3], old.type_emb.weight[3])  # view
    torch.testing.assert_close(new.type_emb.weight[2], fresh_cart)  # cart keeps its fresh init
    assert torch.equal(new.type_emb.weight[PAD], torch.zeros(8))
    # an earlier model without types: tonight's types start fresh, every other weight is copied
    plain = _model(n_event_types=0, seed=2)
    new = _model(n_event_types=3, seed=3)
    before = new.type_emb.weight.detach().clone()
    report = WarmStart(TrainedModel(plain, users, items), "old", items, event_types=_types(["a", "b", "c"])).apply(new)
    assert (report["event_types_from_source"], report["event_types_new"]) == (0, 3)
    assert torch.equal(new.type_emb.weight, before)
    assert torch.equal(new.item_emb.weight, plain.item_emb.weight)


# --- planted task -----------------------------------------------------------------------------------------

N_PLANTED = 100  # a history moves at most 13 x 7 = 91 items on: never back onto itself


def _planted(n_users: int, seed: int) -> pl.DataFrame:
    """Each event is a view (1) or a purchase (2) at random; after a view the next item is item + 1, after a
    purchase item + 7 (mod 100). The items alone leave two equally likely next items, neither seen before;
    the type decides."""
    rng = random.Random(seed)
    rows = []
    for user in range(n_users):
        item, items, kinds = rng.randrange(N_PLANTED), [], []
        for _ in range(14):
            kind = rng.choice((1, 2))
            items.append(item + 1)
            kinds.append(kind)
            item = (item + (1 if kind == 1 else 7)) % N_PLANTED
        rows.append((user, items[:-1], items[-1:], [], kinds[:-1], kinds[-1:], []))
    return pl.DataFrame(rows, schema=SEQUENCES | SEQUENCE_TYPES, orient="row")


CFG = {"model": {"max_len": 14, "hidden": 32, "n_blocks": 1, "n_heads": 1, "dropout": 0.1},
       "train": {"batch_size": 32, "lr": 5e-3, "progress": False, "max_epochs": 20, "patience": 50}}


def test_types_decide_what_items_alone_cannot(tmp_path):
    """Without types the best ranking puts the two possible next items first: NDCG@10 at most
    (1 + 1/log2 3) / 2 = 0.815 in expectation (one user: 1 or 0.631, so 0.011 s.e. over 300 users; the best
    epoch's estimate runs above it by selection); with types the next item is known."""
    seqs = _planted(300, seed=5)
    items_only = train_model(build_config(CFG), seqs, N_PLANTED, tmp_path / "items")
    typed = train_model(build_config(CFG | {"model": CFG["model"] | {"event_types": True}}), seqs, N_PLANTED,
                        tmp_path / "typed", n_event_types=2)
    assert typed.model.n_event_types == 2
    assert items_only.best_val_ndcg < 0.815 + 4 * 0.011
    assert typed.best_val_ndcg > 0.9


# --- repeat bias by event type ----------------------------------------------------------------------------

def test_repeat_bias_adds_each_window_events_type_bonus():
    torch.manual_seed(0)
    model = SASRec(n_items=N_ITEMS, max_len=MAX_LEN, hidden=8, n_blocks=1, n_heads=1, dropout=0.0,
                   repeat_bias=True, n_event_types=N_TYPES).eval()
    with torch.no_grad():
        model.repeat_weight.copy_(torch.arange(1.0, MAX_LEN + 1))  # w[d] = d + 1
        model.repeat_type_weight.copy_(torch.tensor([10.0, 20.0, 30.0]))  # u[1..3]; u[0] = 0
    u = torch.tensor([0.0, 10.0, 20.0, 30.0])
    t = ITEMS.shape[1]
    real = ITEMS != PAD
    with torch.no_grad():
        last = model.history_bias(ITEMS, types=TYPES)
        every = model.history_bias(ITEMS, all_positions=True, types=TYPES)
    want = torch.stack([torch.tensor([(t - s) + float(u[TYPES[b, s]]) if real[b, s] else 0.0 for s in range(t)])
                        for b in range(3)])
    torch.testing.assert_close(last, want)
    for b in range(3):
        for q in range(t):
            for s in range(t):
                expect = (q - s + 1) + float(u[TYPES[b, s]]) if real[b, s] and s <= q else 0.0
                assert float(every[b, q, s]) == pytest.approx(expect), (b, q, s)
    with pytest.raises(ValueError, match="event types"):
        model.history_bias(ITEMS)
    # the scores add the bonus, repeats summed: item 1 twice in row 0 (types 2 and 3)
    with torch.no_grad():
        plain = model.score(model.user_vectors(ITEMS, TYPES))
        got = model.scores(ITEMS, TYPES)
    assert float(got[0, 1] - plain[0, 1]) == pytest.approx((3 + 20) + (1 + 30))


def _carted(n_users: int, seed: int) -> pl.DataFrame:
    """Blocks of 6 events: 5 distinct random items, all views (2) but one carted (1) at a random place, then
    that carted item again as a purchase (3). The last block's purchase is the val target; every item of
    the window competes (seen items are not excluded): the recency of the carted item tells nothing, its
    type tells all."""
    rng = random.Random(seed)
    rows = []
    for user in range(n_users):
        items, kinds = [], []
        for _ in range(5):
            block = rng.sample(range(1, 301), 5)
            cart = rng.randrange(5)
            items += [*block, block[cart]]
            kinds += [1 if i == cart else 2 for i in range(5)] + [3]
        rows.append((user, items[:-1], items[-1:], [], kinds[:-1], kinds[-1:], []))
    return pl.DataFrame(rows, schema=SEQUENCES | SEQUENCE_TYPES, orient="row")


def test_type_bonus_finds_the_carted_item_that_recency_cannot(tmp_path):
    """Repeat bias alone ranks the 5 window items of the last block by recency, the target at a uniform place
    among them: NDCG@10 about (1 + 0.63 + 0.5 + 0.43 + 0.39) / 5 = 0.59 at best; with the bonus by type the
    carted item comes first."""
    seqs = _carted(200, seed=7)
    cfg = {"model": {"max_len": 30, "hidden": 16, "n_blocks": 1, "n_heads": 1, "dropout": 0.1,
                     "repeat_bias": True},
           "train": {"batch_size": 32, "lr": 5e-3, "progress": False, "max_epochs": 15, "patience": 50},
           "evaluate": {"exclude_seen": False}}
    recency = train_model(build_config(cfg), seqs, 300, tmp_path / "recency")
    typed_cfg = cfg | {"model": cfg["model"] | {"event_types": True}}
    typed = train_model(build_config(typed_cfg), seqs, 300, tmp_path / "typed", n_event_types=3)
    assert typed.model.repeat_type_weight is not None
    bonus = typed.model.repeat_type_weight.detach()
    assert bonus[0] > bonus[1] and bonus[0] > bonus[2]  # a carted item gets more than a viewed or bought one
    assert recency.best_val_ndcg < 0.7
    assert typed.best_val_ndcg > 0.9


def test_warm_start_matches_the_type_bonus_by_name():
    def repeat_model(seed: int) -> SASRec:
        torch.manual_seed(seed)
        return SASRec(n_items=N_ITEMS, max_len=MAX_LEN, hidden=8, n_blocks=2, n_heads=2, dropout=0.0,
                      repeat_bias=True, n_event_types=N_TYPES).eval()

    old = repeat_model(seed=0)
    with torch.no_grad():
        old.repeat_weight.copy_(torch.linspace(0.9, -0.4, MAX_LEN))
        old.repeat_type_weight.copy_(torch.tensor([1.0, 2.0, 3.0]))  # buy, click, view
    items = _item_map(N_ITEMS)
    users = items.select("item_id", pl.col("item_idx").alias("user_idx"))
    source = TrainedModel(old, users, items, event_types=_types(["buy", "click", "view"]))
    new = repeat_model(seed=1)  # tonight: cart is new, click is gone
    assert torch.equal(new.repeat_type_weight, torch.zeros(N_TYPES))  # a fresh bonus is zero
    report = WarmStart(source, "old", items, event_types=_types(["buy", "cart", "view"])).apply(new)
    assert (report["event_types_from_source"], report["event_types_new"]) == (2, 1)
    # row r is type_idx r + 1: buy and view from the source by name, cart keeps its fresh zero
    assert torch.equal(new.repeat_type_weight, torch.tensor([1.0, 0.0, 3.0]))
    assert torch.equal(new.repeat_weight, old.repeat_weight)  # the recency bonus by distance, as it is


# --- loss weights by the target's event type (train.type_weights) -----------------------------------------

@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_type_weights_weigh_each_position_by_its_targets_type(attention):
    """The system's training loss is sum(w[type] * CE) / sum(w[type]) over the positions with a target."""
    import torch.nn.functional as F

    from recsys.system import SASRecSystem

    torch.manual_seed(0)
    system = SASRecSystem(n_items=N_ITEMS, max_len=8, hidden=8, n_blocks=1, n_heads=1, dropout=0.0,
                          attention=attention, mask_prob=0.4)
    weights = torch.tensor([1.0, 0.0, 0.5, 4.0])  # none, type 1, type 2, type 3
    system.set_type_weights(weights)
    seq = torch.randint(1, N_ITEMS + 1, (6, 9))
    seq[:2, :3] = PAD
    kinds = (seq % N_TYPES + 1) * (seq != PAD)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:].masked_fill(seq[:, :-1] == PAD, PAD),
             "input_types": kinds[:, :-1], "target_types": kinds[:, 1:]}
    torch.manual_seed(1)
    inputs, targets, types, target_types = system._training_inputs(batch)
    loss = system._train_loss(inputs, targets, types, target_types)
    with torch.no_grad():
        hidden = system.model(inputs, types)
    logits = (hidden @ system.model.item_embeddings().T)[..., 1:]  # (B, W, I)
    real = targets != PAD
    w = weights[target_types][real]
    ce = F.cross_entropy(logits[real], targets[real] - 1, reduction="none")
    torch.testing.assert_close(loss.detach(), (w * ce).sum() / w.sum())
    assert bool((target_types[real] == (targets[real] % N_TYPES + 1)).all())  # the targets' own types
    with pytest.raises(ValueError, match="loss=ce"):
        SASRecSystem(n_items=N_ITEMS, max_len=8, loss="bce").set_type_weights(weights)


def test_type_weights_config_is_checked():
    with pytest.raises(ValueError, match="train.type_weights applies to train.loss=ce"):
        build_config({"train": {"loss": "bce", "type_weights": {"buy": 2.0}}})
    with pytest.raises(ValueError, match="finite and >= 0"):
        build_config({"train": {"type_weights": {"buy": -1.0}}})


def _views_or_buys(n_users: int, seed: int) -> pl.DataFrame:
    """Pairs (context x, outcome): after x (a view, 1..30) comes x + 30 as a view (60 %) or x + 60 as a
    purchase (40 %). Counted plainly the view is likelier; weighted by purchase 4 the purchase wins."""
    rng = random.Random(seed)
    rows = []
    for user in range(n_users):
        items, kinds = [], []
        for _ in range(10):
            x = rng.randint(1, 30)
            bought = rng.random() < 0.4
            items += [x, x + (60 if bought else 30)]
            kinds += [1, 2 if bought else 1]  # 1 view, 2 purchase
        rows.append((user, items[:-1], items[-1:], [], kinds[:-1], kinds[-1:], []))
    return pl.DataFrame(rows, schema=SEQUENCES | SEQUENCE_TYPES, orient="row")


def test_weighting_purchases_ranks_the_likely_purchase_first(tmp_path):
    """The share of users whose purchase outcome scores above the view outcome of their last context: an exact
    fit gives 0 plainly and 1 weighted; the best validation epoch of a small model gets near."""
    seqs = _views_or_buys(300, seed=3)
    cfg = {"model": {"max_len": 20, "hidden": 32, "n_blocks": 1, "n_heads": 1, "dropout": 0.1},
           "train": {"batch_size": 32, "lr": 5e-3, "progress": False, "max_epochs": 15, "patience": 50}}
    plain = train_model(build_config(cfg), seqs, 90, tmp_path / "plain").model
    weighted = train_model(build_config(cfg | {"train": cfg["train"] | {"type_weights": {"purchase": 4.0}}}),
                           seqs, 90, tmp_path / "weighted", type_weights=torch.tensor([1.0, 1.0, 4.0])).model
    # each user's train history ends on a context x: which outcome does each model put higher?
    histories = torch.tensor([h[-20:] for h in seqs["train_items"].to_list()])
    contexts = histories[:, -1]
    rows = torch.arange(len(contexts))

    def purchase_first(model: SASRec) -> float:
        with torch.no_grad():
            scores = model.scores(histories)
        return float((scores[rows, contexts + 60] > scores[rows, contexts + 30]).float().mean())

    assert purchase_first(plain) < 0.3  # the likelier view first (0.20 of users when written)
    assert purchase_first(weighted) > 0.7  # the purchase, weighted 4 x 0.4 > 0.6 (0.86 when written)
