"""Event types as model input (model.event_types) through the jobs: the model directory keeps the type table,
the candidates and the MLflow pyfunc model rank with each history event's type, types are matched by name
between a model and other features (candidates, warm start), and a model with types needs features with them.

Oracle: with an exact (Flat) index the candidates are the top k of ``model.scores(items, types)`` over each
user's last max_len events, left-padded, seen items excluded; the test builds those inputs from the feature
set itself, with plain Python lists.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import polars as pl
import pytest
import torch

from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from recsys.candidates import load_trained_model
from recsys.model import load_model
from recsys.serving import Recommender
from tests.pipelines.conftest import tiny

DAY = "2024-05-01"
K = 5  # candidates.k of the TINY config
TYPED = ["model.event_types=true", "candidates.index=Flat", "evaluate.type_segments=true"]
FILE = ["data.source=file", "data.event_type_col=event_type"]
# One epoch at a learning rate far below float32 resolution of the weights: the warm-started weights stay as
# they were loaded (tests/pipelines/test_warm_start_job.py).
FROZEN = ["train.lr=1e-12", "train.max_epochs=1"]
NEW_ITEM = 10**6  # an item id the first model never saw
RENAMED = "wishlist"  # tonight's name for 'click': it sorts after 'view', so every type_idx moves


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory after `recsys run` with model.event_types=true on the synthetic events (which have
    types view, click and purchase)."""
    work = tmp_path_factory.mktemp("event-types") / "work"
    assert main(["run", "--quiet", "--run-date", DAY, *tiny(work), *TYPED]) == EXIT_OK
    return work


@pytest.fixture(scope="module")
def renamed(typed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Features (work/features) of the same events with 'click' renamed and, for every 4th user, a 'purchase'
    of NEW_ITEM among its last events: type_idx purchase 1, view 2, wishlist 3 (the model's: click 1, purchase
    2, view 3)."""
    root = tmp_path_factory.mktemp("renamed")
    events = pl.read_csv(typed / "input" / "events.csv").with_columns(
        pl.col("event_type").replace("click", RENAMED))
    extra = []
    times_of = events.group_by("user_id").agg(pl.col("timestamp").sort()).sort("user_id")
    for i, (user, times) in enumerate(times_of.iter_rows()):
        if i % 4 == 0:  # strictly between two of the last events (duplicates share a timestamp)
            j = next(j for j in range(len(times) - 2, 0, -1) if times[j - 1] + 1 < times[j])
            assert j >= len(times) - 5
            extra.append((user, NEW_ITEM, (times[j - 1] + times[j]) // 2, "purchase"))
    events = pl.concat([events, pl.DataFrame(extra, schema=events.schema, orient="row")])
    events.write_csv(root / "events.csv")
    work = root / "work"
    assert main(["features", "--quiet", *tiny(work), *FILE, f"data.path={root / 'events.csv'}"]) == EXIT_OK
    return work


def _left_pad(lists: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    return torch.tensor([[0] * (width - len(x[-width:])) + list(x[-width:]) for x in lists], dtype=torch.long)


def _top_k(model, items: list[list[int]], types: list[list[int]], k: int = K) -> list[list[int]]:
    """The exact top k item_idx of ``model.scores`` per history (last max_len events), seen items excluded."""
    with torch.no_grad():
        scores = model.scores(_left_pad(items, model.max_len), _left_pad(types, model.max_len))
    scores[:, 0] = -torch.inf
    for row, history in enumerate(items):
        scores[row, history] = -torch.inf
    return scores.topk(k).indices.tolist()


def _histories(features: Path) -> pl.DataFrame:
    """Per user, by user_id: the full history (train + val + test, time order) as item ids and type names."""
    item_id = dict(pl.read_parquet(features / "item_map.parquet").select("item_idx", "item_id").iter_rows())
    type_name = dict(pl.read_parquet(features / "event_types.parquet").select("type_idx", "event_type")
                     .iter_rows())
    seqs = pl.read_parquet(features / "sequences.parquet").join(
        pl.read_parquet(features / "user_map.parquet"), on="user_idx").sort("user_id")
    rows = []
    for row in seqs.iter_rows(named=True):
        items = row["train_items"] + row["val_items"] + row["test_items"]
        types = row["train_types"] + row["val_types"] + row["test_types"]
        assert len(items) == len(types)
        rows.append((row["user_id"], [item_id[i] for i in items], [type_name[t] for t in types]))
    return pl.DataFrame(rows, schema=["user_id", "history", "event_types"], orient="row")


def _in_model(model_dir: Path, history: list, names: list[str]) -> tuple[list[int], list[int]]:
    """A history in the model's indices, by id and by name: items it never saw dropped with their types, type
    names it never saw as 0."""
    item_idx = dict(pl.read_parquet(model_dir / "item_map.parquet").select("item_id", "item_idx").iter_rows())
    type_idx = dict(pl.read_parquet(model_dir / "event_types.parquet").select("event_type", "type_idx")
                    .iter_rows())
    kept = [(item_idx[i], type_idx.get(t, 0)) for i, t in zip(history, names, strict=True) if i in item_idx]
    return [i for i, _ in kept], [t for _, t in kept]


def _candidates(work: Path, day: str = DAY) -> dict:
    table = pl.read_parquet(work / "candidates" / f"date={day}" / "candidates.parquet")
    lists = table.sort("user_id", "rank").group_by("user_id", maintain_order=True).agg("item_id")
    return dict(lists.iter_rows())


def _oracle(model_dir: Path, hist: pl.DataFrame, zero_types: bool = False) -> list[list]:
    """The expected top K item ids per row of ``hist`` (_histories) for the model in ``model_dir``."""
    model = load_model(model_dir)
    pairs = [_in_model(model_dir, h, t) for h, t in hist.select("history", "event_types").iter_rows()]
    items = [i for i, _ in pairs]
    types = [[0] * len(t) if zero_types else t for _, t in pairs]
    to_id = dict(pl.read_parquet(model_dir / "item_map.parquet").select("item_idx", "item_id").iter_rows())
    return [[to_id[i] for i in top] for top in _top_k(model, items, types)]


def _test_ndcg_at_10(work: Path, model, zero_types: bool = False, seen_compete: bool = False) -> float:
    """Mean NDCG@10 of each user's single test item (leave one out) ranked after train + val, the history's
    other items excluded (competing with ``seen_compete``), ties counted against the target."""
    seqs = pl.read_parquet(work / "features" / "sequences.parquet")
    seqs = seqs.filter(pl.col("test_items").list.len() > 0)
    assert (seqs["test_items"].list.len() == 1).all()
    items = [t + v for t, v in seqs.select("train_items", "val_items").rows()]
    types = [t + v for t, v in seqs.select("train_types", "val_types").rows()]
    types = [[0] * len(t) for t in types] if zero_types else types
    with torch.no_grad():
        scores = model.scores(_left_pad(items, model.max_len), _left_pad(types, model.max_len))
    gains = []
    for row, (history, target) in enumerate(zip(items, seqs["test_items"].list.first(), strict=True)):
        competitors = torch.ones(model.n_items + 1, dtype=torch.bool)
        competitors[[0, target, *([] if seen_compete else history)]] = False
        rank = int((scores[row][competitors] >= scores[row, target]).sum())
        gains.append(1 / math.log2(rank + 2) if rank < 10 else 0.0)
    return sum(gains) / len(gains)


def test_the_model_directory_keeps_the_event_types(typed):
    model_dir = typed / "model"
    types = pl.read_parquet(typed / "features" / "event_types.parquet")
    assert types["event_type"].to_list() == ["click", "purchase", "view"]
    assert pl.read_parquet(model_dir / "event_types.parquet").equals(types)
    assert json.loads((model_dir / "model.json").read_text())["n_event_types"] == 3
    model = load_model(model_dir)
    assert model.n_event_types == 3 and model.type_emb is not None
    assert tuple(model.type_emb.weight.shape) == (4, 16)  # type 0 (none) + 3, hidden 16
    assert model.type_emb.weight[0].abs().sum() == 0 and model.type_emb.weight[1:].abs().min() > 0
    # the evaluation scores the test items with the history's types: its NDCG@10 is the oracle's
    report = json.loads((typed / "evaluation" / "report.json").read_text())
    assert report["model"]["ndcg_at_10"] == pytest.approx(_test_ndcg_at_10(typed, model), abs=1e-6)
    assert abs(report["model"]["ndcg_at_10"] - _test_ndcg_at_10(typed, model, zero_types=True)) > 1e-4
    assert json.loads((model_dir / "train_report.json").read_text())["warm_start"] is None
    # evaluate.type_segments: users by their test target's type, counted from the sequences
    seqs = pl.read_parquet(typed / "features" / "sequences.parquet").filter(pl.col("test_items").list.len() > 0)
    counts = seqs["test_types"].list.first().value_counts()
    want = {types["event_type"][int(i) - 1]: n for i, n in counts.iter_rows()}
    for name in ("model", "popularity"):
        assert {k: v["n_users"] for k, v in report[name]["type_segments"].items()} == want


def test_candidates_are_the_exact_top_k_with_the_events_types(typed):
    hist = _histories(typed / "features")
    model = load_model(typed / "model")
    # the oracle's premises: windows are cut (histories longer than max_len) and hold types other than 'view'
    assert max(hist["history"].list.len()) > model.max_len
    assert any(set(t[-model.max_len:]) != {"view"} for t in hist["event_types"])
    got = _candidates(typed)
    assert list(got) == hist["user_id"].to_list()  # every user, in user_id order
    expected = _oracle(typed / "model", hist)
    assert [got[u] for u in hist["user_id"]] == expected
    # the types matter: with every type 0 the scores, and some users' lists, are others
    blank = _oracle(typed / "model", hist, zero_types=True)
    changed = sum(a != b for a, b in zip(expected, blank, strict=True))
    assert changed > 0, "all-zero types give the same candidates for every user"


def test_pyfunc_serves_the_candidates_from_item_ids_and_type_names(typed):
    hist = _histories(typed / "features")
    served = mlflow.pyfunc.load_model(str(typed / "model"))
    inputs = [field["name"] for field in served.metadata.get_input_schema().to_dict()]
    assert inputs == ["history", "event_types"]
    got = served.predict(hist.select("history", "event_types").to_pandas(), params={"k": K})
    candidates = _candidates(typed)
    assert [list(x) for x in got["item_ids"]] == [candidates[u] for u in hist["user_id"]]
    # an item the model never saw is dropped with its type, wherever it is
    head = hist.head(20)
    padded = pd.DataFrame({
        "history": [[10**15, *h[:-1], 10**15, h[-1]] for h in head["history"]],
        "event_types": [["purchase", *t[:-1], "purchase", t[-1]] for t in head["event_types"]],
    })
    assert [list(x) for x in served.predict(padded, params={"k": K})["item_ids"]] == \
        [candidates[u] for u in head["user_id"]]
    # a type name the model never saw counts as none (type 0): the oracle with zero types, not the candidates
    nonsense = [["nonsense"] * len(t) for t in hist["event_types"]]
    unknown = hist.with_columns(pl.Series("event_types", nonsense))
    got = [list(x) for x in served.predict(unknown.select("history", "event_types").to_pandas(),
                                           params={"k": K})["item_ids"]]
    assert got == _oracle(typed / "model", hist, zero_types=True)
    assert got != [candidates[u] for u in hist["user_id"]]
    # types are read as the features job reads them: padded names are those names; a null (MLflow's check of the
    # old Array(string) signature turned a row holding one into one-letter names, all unknown), NaN, a blank or a
    # missing-value marker is no type at its own position only, as an unknown name is
    padded = head.with_columns(pl.col("event_types").list.eval(pl.lit(" ") + pl.element() + pl.lit(" ")))
    assert [list(x) for x in served.predict(padded.select("history", "event_types").to_pandas(),
                                            params={"k": K})["item_ids"]] == [candidates[u] for u in head["user_id"]]

    def first_type(value):
        return pd.DataFrame({"history": head["history"].to_list(),
                             "event_types": [[value, *t[1:]] for t in head["event_types"].to_list()]})

    expected = [list(x) for x in served.predict(first_type("nonsense"), params={"k": K})["item_ids"]]
    for missing in (None, float("nan"), "", "NULL"):
        assert [list(x) for x in served.predict(first_type(missing), params={"k": K})["item_ids"]] == expected
    # a null cell: no type for any event of that history (a TypeError before, not naming the column)
    no_types = pd.DataFrame({"history": head["history"].to_list()[:2], "event_types": [None, ["nonsense"] * len(
        head["history"][1])]})
    all_unknown = pd.DataFrame({"history": head["history"].to_list()[:2],
                                "event_types": [["nonsense"] * len(h) for h in head["history"].to_list()[:2]]})
    assert [list(x) for x in served.predict(no_types, params={"k": K})["item_ids"]] == \
        [list(x) for x in served.predict(all_unknown, params={"k": K})["item_ids"]]
    with pytest.raises(Exception, match="event_types"):  # MLflow's signature lists the column as required
        served.predict(head.select("history").to_pandas(), params={"k": K})
    # and the model itself, without the signature's check, names the column too
    recommender = Recommender(load_trained_model(typed / "model"))
    with pytest.raises(ValueError, match="needs a 'event_types' column"):
        recommender.predict(head.select("history").to_pandas())
    with pytest.raises(ValueError, match="one type per 'history' item"):
        recommender.predict(pd.DataFrame({"history": [[int(head["history"][0][0])]], "event_types": [[]]}))


def test_event_types_need_features_with_types(typed, tmp_path, capsys):
    pl.read_csv(typed / "input" / "events.csv").drop("event_type").write_csv(tmp_path / "events.csv")
    work = tmp_path / "work"
    data = ["data.source=file", f"data.path={tmp_path / 'events.csv'}"]
    assert main(["features", "--quiet", *tiny(work), *data]) == EXIT_OK
    assert not (work / "features" / "event_types.parquet").exists()
    capsys.readouterr()
    assert main(["train", "--quiet", *tiny(work), *data, *TYPED]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "model.event_types" in err and "data.event_type_col" in err
    assert not (work / "model").exists()
    # a model with types cannot score these features either: candidates and evaluation stop with exit 2
    assert main(["candidates", "--quiet", "--date", DAY, *tiny(work), *data,
                 f"candidates.model={typed / 'model'}"]) == EXIT_USAGE
    assert "data.event_type_col" in capsys.readouterr().err
    assert not (work / "candidates").exists()
    shutil.copytree(typed / "model", work / "model")
    assert main(["evaluate", "--quiet", *tiny(work), *data]) == EXIT_USAGE
    assert "data.event_type_col" in capsys.readouterr().err
    assert not (work / "evaluation" / "report.json").exists()


def test_candidates_of_a_model_map_other_features_types_by_name(typed, renamed, tmp_path):
    types = pl.read_parquet(renamed / "features" / "event_types.parquet")
    assert types.select("event_type", "type_idx").rows() == [("purchase", 1), ("view", 2), (RENAMED, 3)]
    work = tmp_path / "work"
    shutil.copytree(renamed / "features", work / "features")
    assert main(["candidates", "--quiet", "--date", DAY, *tiny(work), *FILE,
                 f"candidates.model={typed / 'model'}", "candidates.index=Flat"]) == EXIT_OK
    hist = _histories(work / "features")
    assert hist.filter(pl.col("history").list.contains(NEW_ITEM)).height == (hist.height + 3) // 4
    got = _candidates(work)
    # the model's inputs: NEW_ITEM's events dropped with their types, 'wishlist' as none, the rest by name
    assert [got[u] for u in hist["user_id"]] == _oracle(typed / "model", hist)


def test_warm_start_matches_event_types_by_name(typed, renamed, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(renamed / "features", work / "features")
    init = f"train.init_from={typed / 'model'}"
    assert main(["train", "--quiet", *tiny(work), *FILE, *TYPED, *FROZEN, init]) == EXIT_OK
    report = json.loads((work / "model" / "train_report.json").read_text())["warm_start"]
    assert (report["event_types_from_source"], report["event_types_new"]) == (2, 1)
    assert (report["items_new"], report["items_from_source"]) == (1, load_model(typed / "model").n_items)
    old, new = (load_model(d).type_emb.weight.detach() for d in (typed / "model", work / "model"))
    # purchase 2 -> 1 and view 3 -> 2 carried over by name; wishlist (3) is fresh, unlike any earlier row
    torch.testing.assert_close(new[[1, 2]], old[[2, 3]], rtol=0, atol=1e-8)
    assert (new[3] - old[1:]).abs().amax(dim=1).min() > 1e-3
    assert new[0].abs().sum() == 0
    assert pl.read_parquet(work / "model" / "event_types.parquet").equals(
        pl.read_parquet(renamed / "features" / "event_types.parquet"))


def test_type_weights_train_and_name_unknown_types(new_work, capsys):
    """train.type_weights from the command line: a known type trains (the weights reach the loss: another
    model than without them); a type the features do not hold is exit 2 naming the key and the types."""
    plain, weighted, bad = new_work("plain"), new_work("weighted"), new_work("bad")
    assert main(["train", "--quiet", *tiny(plain)]) == EXIT_OK
    assert main(["train", "--quiet", *tiny(weighted), "train.type_weights={purchase: 5.0, view: 0.5}"]) == EXIT_OK
    a = torch.load(plain / "model" / "model.pt", weights_only=True)
    b = torch.load(weighted / "model" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and not torch.equal(a["item_emb.weight"], b["item_emb.weight"])
    capsys.readouterr()
    assert main(["train", "--quiet", *tiny(bad), "train.type_weights={purchse: 2.0}"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "train.type_weights" in err and "purchse" in err and "purchase" in err
    assert not (bad / "model").exists()


def test_evaluate_refuses_features_whose_types_differ_by_name(typed, renamed, tmp_path, capsys):
    """The renamed features hold as many types as the model (3) but not the same ones: evaluation, which
    scores the model with the features' own type indices, stops (exit 2) instead of mixing them up."""
    work = tmp_path / "work"
    shutil.copytree(renamed / "features", work / "features")
    shutil.copytree(typed / "model", work / "model")
    capsys.readouterr()
    assert main(["evaluate", "--quiet", *tiny(work), *FILE]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'click', 'purchase', 'view'" in err and "wishlist" in err and "data.event_type_col" in err
    assert not (work / "evaluation" / "report.json").exists()
