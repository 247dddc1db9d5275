"""model.ensemble: K independently initialised SASRec networks scored by the mean of their scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import polars as pl
import pytest
import torch

from pipelines.cli import EXIT_OK, main
from recsys.candidates import load_trained_model
from recsys.config import ConfigError, build_config
from recsys.evaluation import build_eval_set, evaluate_model_blocked, evaluate_scorer, model_scorer
from recsys.model import KWARGS_FILE, SASRec, SASRecEnsemble, load_model, save_model
from recsys.retrieval import build_index, search_top_k
from recsys.serving import Recommender
from recsys.system import SASRecSystem
from recsys.training import train_model
from tests.pipelines.conftest import tiny
from tests.recsys.test_system import planted_sequences, popularity_ndcg, small_config

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")

N_ITEMS, MAX_LEN = 30, 8
ARCH = dict(n_items=N_ITEMS, max_len=MAX_LEN, hidden=16, n_blocks=1, n_heads=2, dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_histories(rows: int = 6, seed: int = 0) -> torch.Tensor:
    """(rows, MAX_LEN) left-padded item indices 1..N_ITEMS, row r with r % MAX_LEN + 1 items."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (rows, MAX_LEN), generator=g)
    lengths = torch.arange(rows) % MAX_LEN + 1  # (rows,)
    return items * (torch.arange(MAX_LEN) >= MAX_LEN - lengths[:, None])  # (rows, MAX_LEN)


def member_mean(ensemble: SASRecEnsemble, items: torch.Tensor) -> torch.Tensor:
    """The oracle: each member's own ``score(user_vectors)``, averaged. (B, n_items + 1)."""
    return torch.stack([m.score(m.user_vectors(items)) for m in ensemble.members]).mean(0)


# --- (1) scoring -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_ensemble_score_is_the_mean_of_the_members_scores(attention: str) -> None:
    torch.manual_seed(0)
    ensemble = SASRecEnsemble(3, **ARCH, attention=attention).eval()
    first, second = ensemble.members[0], ensemble.members[1]
    assert not torch.equal(first.item_emb.weight, second.item_emb.weight)  # independently initialised
    assert not torch.equal(first.blocks[0].qkv.weight, second.blocks[0].qkv.weight)
    items = random_histories()
    with torch.no_grad():
        expected = member_mean(ensemble, items)  # (B, I + 1)
        users, table = ensemble.user_vectors(items), ensemble.item_embeddings()
        assert users.shape == (len(items), 3 * 16) and table.shape == (N_ITEMS + 1, 3 * 16)
        torch.testing.assert_close(ensemble.scores(items), expected)
        torch.testing.assert_close(ensemble.score(users), expected)
        # FAISS candidates: an inner-product index over the item rows (row r = item r + 1)
        found = search_top_k(build_index(table[1:].numpy()), users.numpy(), k=5)
    best = expected[:, 1:].topk(5)
    torch.testing.assert_close(torch.from_numpy(found.scores), best.values)
    assert torch.equal(torch.from_numpy(found.ids).long(), best.indices)
    # and every position of the training forward pass, for causal attention
    if attention == "causal":
        with torch.no_grad():
            each = torch.stack([m.score(m(items)) for m in ensemble.members]).mean(0)  # (B, T, I + 1)
            torch.testing.assert_close(ensemble.score(ensemble(items)), each)


def test_blocked_evaluation_and_the_dense_path_agree_on_an_ensemble() -> None:
    torch.manual_seed(1)
    ensemble = SASRecEnsemble(2, **ARCH).eval()
    eval_set = build_eval_set(planted_sequences(80, N_ITEMS), "val", MAX_LEN)
    dense = evaluate_scorer(model_scorer(ensemble, eval_set), eval_set, N_ITEMS, (5, 10))
    blocked = evaluate_model_blocked(ensemble, eval_set, N_ITEMS, (5, 10), item_block_size=7)
    assert dense == pytest.approx(blocked, abs=1e-6)


OPTIONS = dict(repeat_bias=True, n_event_types=3, n_feature_values=5, feature_slots=2)


def with_options(members: int = 3) -> tuple[SASRecEnsemble, torch.Tensor, torch.Tensor]:
    """An ensemble with every member option (repeat bias by distance and event type, event types, item
    attributes), every member's repeat weights and type tables moved off their init, and (items, types)."""
    torch.manual_seed(0)
    ensemble = SASRecEnsemble(members, **ARCH, **OPTIONS).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (N_ITEMS + 1, 2), generator=g)
    ids[0] = 0
    ensemble.set_item_features(ids, torch.tensor([0, 1, 1, 2, 2, 2]), torch.arange(N_ITEMS + 1) % 4 != 1)
    with torch.no_grad():
        for m in ensemble.members:  # repeat weights start at 0: give each member its own
            for p in m.repeat_parameters():
                p.normal_(generator=g)
    items = random_histories(8, seed=2)
    types = torch.randint(1, 4, items.shape, generator=g) * (items != 0)
    return ensemble, items, types


def test_ensemble_with_types_attributes_and_repeat_bias_scores_the_members_mean() -> None:
    ensemble, items, types = with_options()
    assert ensemble.repeat_bias and ensemble.n_event_types == 3 and ensemble.n_feature_values == 5
    with torch.no_grad():
        each = [m.scores(items, types) for m in ensemble.members]  # (B, I + 1) each, bias included
        assert all((each[0] - e).abs().max() > 1e-3 for e in each[1:])  # the members differ
        torch.testing.assert_close(ensemble.scores(items, types), torch.stack(each).mean(0))
        # the repeat bias is part of it: without it the scores are the plain dot products' mean
        plain = ensemble.score(ensemble.user_vectors(items, types))
        assert (ensemble.scores(items, types) - plain).abs().max() > 1e-2
        # training's per-position bias: the mean of the members'
        torch.testing.assert_close(
            ensemble.history_bias(items, all_positions=True, types=types),
            torch.stack([m.history_bias(items, all_positions=True, types=types) for m in ensemble.members]).mean(0))
        # every member reads the types and its own attributes
        assert (ensemble.scores(items, types) - ensemble.scores(items, torch.zeros_like(types))).abs().max() > 1e-3
        for m in ensemble.members:
            assert torch.equal(m.item_feature_ids, ensemble.members[0].item_feature_ids)
    with pytest.raises(ValueError, match="event types"):
        ensemble.scores(items)


def test_saved_ensemble_with_options_loads_with_identical_scores(tmp_path: Path) -> None:
    ensemble, items, types = with_options(2)
    save_model(ensemble, tmp_path)
    loaded = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.scores(items, types), ensemble.scores(items, types))


def test_every_members_repeat_weights_get_the_repeat_learning_rate() -> None:
    system = SASRecSystem(**ARCH, repeat_bias=True, n_event_types=3, lr=1e-3, ensemble=3)
    system._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    groups = system.configure_optimizers()["optimizer"].param_groups
    assert len(groups) == 3
    biases = {id(p) for p in groups[2]["params"]}
    want = {id(p) for m in system.model.members for p in (m.repeat_weight, m.repeat_type_weight)}
    assert biases == want and len(want) == 6
    assert groups[2]["lr"] > groups[0]["lr"] and groups[2]["weight_decay"] == 0.0
    assert not biases & {id(p) for g in groups[:2] for p in g["params"]}


# --- (2) training ------------------------------------------------------------------------------------------

LOSS_CASES = [
    dict(loss="ce"),
    dict(loss="ce", label_smoothing=0.1),
    dict(loss="ce", train_exclude_seen=True),
    dict(loss="sampled_softmax", n_negatives=5),
    dict(loss="gbce", n_negatives=5),
    dict(loss="bce", n_negatives=2),
    dict(loss="ce", attention="bidirectional"),
    dict(loss="ce", repeat_bias=True, n_event_types=3),  # repeat bias by distance and by event type
    dict(loss="ce", n_event_types=3),
]


def batch(attention: str = "causal") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, MAX_LEN): next items, or for bidirectional attention a masked batch."""
    items = random_histories(8, seed=3)
    inputs = torch.cat([torch.zeros_like(items[:, :1]), items[:, :-1]], 1)  # (B, T) shifted by one
    targets = items * (inputs != 0)
    if attention == "bidirectional":
        masked = (torch.arange(MAX_LEN) % 3 == 0) & (items != 0)  # (B, T) every third real position
        return torch.where(masked, N_ITEMS + 1, items), torch.where(masked, items, 0)
    return inputs, targets


def alone(system: SASRecSystem, i: int) -> SASRecSystem:
    """A single-network system of the same hyper-parameters holding member ``i``'s weights."""
    single = SASRecSystem(**{**system.hparams, "ensemble": 1})
    single.model.load_state_dict(system.model.members[i].state_dict())
    return single


@pytest.mark.parametrize("options", LOSS_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_training_loss_is_the_mean_of_each_members_own_loss(options: dict) -> None:
    torch.manual_seed(0)
    system = SASRecSystem(**ARCH, **options, ensemble=2)
    inputs, targets = batch(options.get("attention", "causal"))
    seen = inputs if options.get("train_exclude_seen") else None
    types = None
    if options.get("n_event_types"):  # each input's type, 1..3
        types = (torch.arange(inputs.numel()).view(inputs.shape) % 3 + 1) * (inputs != 0)
    if options.get("repeat_bias"):  # repeat weights start at 0: give each member its own
        with torch.no_grad():
            for p in system.model.repeat_parameters():
                p.normal_()
    singles = [alone(system, i) for i in range(2)]
    torch.manual_seed(5)  # the sampled losses draw their negatives member after member, as the singles do
    loss = system._forward_loss(inputs, targets, types, seen=seen)
    torch.manual_seed(5)
    own = [s._forward_loss(inputs, targets, types, seen=seen) for s in singles]
    assert abs(own[0].item() - own[1].item()) > 1e-4  # the members differ, so the mean is not either loss
    torch.testing.assert_close(loss, torch.stack(own).mean())


def adamw_step(system: SASRecSystem, inputs: torch.Tensor, targets: torch.Tensor, eps_scale: float = 1.0) -> None:
    """One step of the system's own optimiser (configure_optimizers: AdamW, its parameter groups), with AdamW's
    eps multiplied by ``eps_scale``."""
    system._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)  # what the schedule reads
    optimizer = system.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        group["eps"] *= eps_scale
    system._forward_loss(inputs, targets).backward()
    optimizer.step()


def test_one_step_moves_each_member_as_a_step_of_that_member_alone() -> None:
    # The ensemble's loss is the MEAN of the K member losses, so member i's gradients are exactly 1/K (K = 2: a
    # power of two) of those it gets alone. AdamW's update m / (sqrt(v) + eps) ignores that scale but for eps:
    # the ensemble's step is the member's own step with eps K x 1e-8 (it matters for gradients near 1e-8 only).
    torch.manual_seed(0)
    lr = 1e-2
    system = SASRecSystem(**ARCH, lr=lr, weight_decay=0.1, ensemble=2)
    singles = [alone(system, i) for i in range(2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in system.model.members]
    inputs, targets = batch()
    adamw_step(system, inputs, targets)
    for i, single in enumerate(singles):
        adamw_step(single, inputs, targets, eps_scale=2.0)
        member, reference = system.model.members[i].state_dict(), single.model.state_dict()
        moved = max(float((member[k] - before[i][k]).abs().max()) for k in member)
        assert moved > lr / 2  # Adam's first step moves a weight by about lr
        for key in member:
            torch.testing.assert_close(member[key], reference[key], rtol=1e-6, atol=1e-9, msg=key)


# --- (3) save / load ---------------------------------------------------------------------------------------

def test_saved_ensemble_loads_with_identical_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ensemble = SASRecEnsemble(2, **ARCH).eval()
    save_model(ensemble, tmp_path)
    assert json.loads((tmp_path / KWARGS_FILE).read_text())["ensemble"] == 2
    loaded = load_model(tmp_path)
    assert isinstance(loaded, SASRecEnsemble) and len(loaded.members) == 2 and not loaded.training
    items = random_histories()
    with torch.no_grad():
        assert torch.equal(loaded.scores(items), ensemble.scores(items))


def test_one_network_is_a_plain_sasrec_saved_as_before(tmp_path: Path) -> None:
    system = SASRecSystem.from_config(build_config({}), n_items=N_ITEMS)
    assert type(system.model) is SASRec
    save_model(system.model, tmp_path / "system")
    save_model(SASRec(N_ITEMS, 50, 64, 2, 1, 0.2), tmp_path / "plain")
    written = (tmp_path / "system" / KWARGS_FILE).read_bytes()
    assert b"ensemble" not in written and written == (tmp_path / "plain" / KWARGS_FILE).read_bytes()
    assert type(load_model(tmp_path / "system")) is SASRec


# --- (4) end to end ----------------------------------------------------------------------------------------

def test_ensemble_training_learns_a_planted_sequence(tmp_path: Path) -> None:
    n_items = 60
    seqs = planted_sequences(400, n_items, seed=1)
    tree = small_config(max_epochs=3).to_dict()
    tree["model"]["ensemble"] = 2
    result = train_model(build_config(tree), seqs, n_items, tmp_path)
    assert isinstance(result.model, SASRecEnsemble) and len(result.model.members) == 2
    first, second = result.model.members
    assert not torch.equal(first.item_emb.weight, second.item_emb.weight)
    baseline = popularity_ndcg(seqs, n_items)  # 0.11 on this data
    assert result.best_val_ndcg > 0.9, result  # 1.0 measured (so is one network's: the pattern is easy)
    assert result.best_val_ndcg > baseline + 0.5, (result.best_val_ndcg, baseline)


def test_ensemble_through_the_jobs(tmp_path: Path) -> None:
    """recsys features, train (model.ensemble=2), evaluate and candidates; the pyfunc model recommends what the
    candidates job does."""
    work = tmp_path / "work"
    for job in ("features", "train", "evaluate"):
        assert main([job, "--quiet", *tiny(work, "model.ensemble=2")]) == EXIT_OK, job
    assert json.loads((work / "model" / KWARGS_FILE).read_text())["ensemble"] == 2
    assert main(["candidates", "--quiet", "--date", "2024-09-01", *tiny(work, "model.ensemble=2")]) == EXIT_OK
    candidates = pl.read_parquet(work / "candidates" / "date=2024-09-01" / "candidates.parquet")
    user = candidates["user_id"][0]
    seq = pl.read_parquet(work / "features" / "sequences.parquet").join(
        pl.read_parquet(work / "features" / "user_map.parquet"), on="user_idx").filter(pl.col("user_id") == user)
    to_id = dict(pl.read_parquet(work / "features" / "item_map.parquet").select("item_idx", "item_id").iter_rows())
    history = [to_id[i] for col in ("train_items", "val_items", "test_items") for i in seq[col][0]]
    got = Recommender(load_trained_model(work / "model")).predict(pd.DataFrame({"history": [history]}),
                                                                  params={"k": 5})
    want = candidates.filter(pl.col("user_id") == user)
    assert list(got["item_ids"][0]) == want["item_id"].to_list()
    assert list(got["scores"][0]) == pytest.approx(want["score"].to_list(), rel=1e-4, abs=1e-5)
    # the next night's training starts from this ensemble (a rate that moves no weight: the same validation)
    best = json.loads((work / "model" / "train_report.json").read_text())["best_val_ndcg_at_10"]
    warm = tmp_path / "warm"
    shutil.copytree(work / "features", warm / "features")
    night = tiny(warm, "model.ensemble=2", f"train.init_from={work / 'model'}", "train.max_epochs=1", "train.lr=1e-12")
    assert main(["train", "--quiet", *night]) == EXIT_OK
    report = json.loads((warm / "model" / "train_report.json").read_text())
    assert report["warm_start"]["items_new"] == 0 and abs(report["best_val_ndcg_at_10"] - best) <= 1e-6


def test_ensemble_with_event_types_and_repeat_bias_through_the_jobs(tmp_path: Path) -> None:
    """`recsys run` with model.ensemble=2, event types and the repeat bias, seen items competing in the
    evaluation and the candidates (so the bias counts there): the evaluation is the oracle's NDCG@10 from
    ``model.scores`` with the history's types, and the candidates are the exact top k of ``model.scores`` (the members' mean, bias
    included) over each user's last max_len events."""
    from tests.pipelines.test_event_types_job import DAY, TYPED, _candidates, _histories, _in_model, _left_pad
    from tests.pipelines.test_event_types_job import K as top_k
    from tests.pipelines.test_event_types_job import _test_ndcg_at_10 as oracle_ndcg

    work = tmp_path / "work"
    options = [*TYPED, "model.ensemble=2", "model.repeat_bias=true", "candidates.exclude_seen=false",
               "evaluate.exclude_seen=false"]
    assert main(["run", "--quiet", "--run-date", DAY, *tiny(work), *options]) == EXIT_OK
    model = load_model(work / "model")
    assert isinstance(model, SASRecEnsemble) and model.n_event_types == 3 and model.repeat_bias
    assert all(float(m.repeat_weight.detach().abs().max()) > 0 for m in model.members)  # trained, not left at 0
    report = json.loads((work / "evaluation" / "report.json").read_text())
    assert report["model"]["ndcg_at_10"] == pytest.approx(oracle_ndcg(work, model, seen_compete=True), abs=1e-6)
    assert abs(report["model"]["ndcg_at_10"] - oracle_ndcg(work, model, zero_types=True, seen_compete=True)) > 1e-4
    hist = _histories(work / "features")
    pairs = [_in_model(work / "model", h, t) for h, t in hist.select("history", "event_types").iter_rows()]
    with torch.no_grad():
        scores = model.scores(_left_pad([i for i, _ in pairs], model.max_len),
                              _left_pad([t for _, t in pairs], model.max_len))
    scores[:, 0] = -torch.inf
    to_id = dict(pl.read_parquet(work / "model" / "item_map.parquet").select("item_idx", "item_id").iter_rows())
    expected = [[to_id[i] for i in row] for row in scores.topk(top_k).indices.tolist()]
    got = _candidates(work)
    assert [got[u] for u in hist["user_id"]] == expected
    seen = sum(len(set(row) & set(h)) for row, h in zip(expected, hist["history"], strict=True))
    assert seen > 0  # the premise: seen items compete and some win a place


# --- (5) config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", [
    {"model": {"repeat_bias": True}},
    {"model": {"event_types": True}},
    {"data": {"item_features": {"path": "items.csv", "columns": ["brand"]}}},
])
def test_config_accepts_an_ensemble_with_each_members_options(tree: dict) -> None:
    """Each member has its own repeat weights, type and attribute tables (refused before session 18)."""
    cfg = build_config({**tree, "model": {**tree.get("model", {}), "ensemble": 2}})
    assert cfg.model.ensemble == 2


def test_config_rejects_an_ensemble_below_one() -> None:
    with pytest.raises(ConfigError, match="model.ensemble"):
        build_config({"model": {"ensemble": 0}})
