"""The pipeline with item attributes (data.item_features): the jobs carry them from the item file to the
candidates, a warm start matches them night over night, and a model with them is refused as the start of one
without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import polars as pl
import pytest
import torch

from features.schema import ITEM_FEATURE_FILES
from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from recsys.data import pad_lists
from recsys.model import SASRec, SASRecEnsemble, load_model
from tests.pipelines.conftest import tiny

DAY = "2024-05-01"


COLD = 3  # items listed in the attribute file with no event


def _item_file(features: Path, path: Path, shift: int = 0) -> Path:
    """An attribute table for the tiny catalogue: a group (item id mod 4, +shift) and 1-2 tags, plus COLD new
    items (ids above the catalogue's) that no event names."""
    ids = pl.read_parquet(features / "item_map.parquet")["item_id"]
    ids = ids.append(pl.Series(range(int(ids.max()) + 1, int(ids.max()) + 1 + COLD)))
    pl.DataFrame({
        "item_id": ids,
        "group": ((ids + shift) % 4).cast(pl.String),
        "tags": pl.Series(["t1|t2" if i % 3 else "t3" for i in ids.to_list()]),
    }).write_csv(path)
    return path


def _attributes(items: Path) -> list[str]:
    return [f"data.item_features.path={items}", "data.item_features.columns=[group,tags]",
            'data.item_features.list_separator="|"', "data.item_features.cold_items=true"]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-network", "ensemble-2"])
def night(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_features: Path
          ) -> tuple[Path, list[str]]:
    """A `recsys run` with attributes, of one network or of an ensemble of two (each member with its own
    attribute-value table); the work directory and the model's extra overrides (model.ensemble)."""
    root = tmp_path_factory.mktemp("item-features")
    items = _item_file(tiny_features, root / "items.csv")
    work = root / "work"
    model = [f"model.ensemble={request.param}"]
    assert main(["run", "--quiet", "--run-date", DAY, *tiny(work), *_attributes(items), *model]) == EXIT_OK
    return work, model


def _network(model: SASRec | SASRecEnsemble) -> SASRec:
    """The model, or an ensemble's first member (each member holds the same item -> attribute table)."""
    if isinstance(model, SASRecEnsemble):
        assert all(torch.equal(m.item_feature_ids, model.members[0].item_feature_ids) for m in model.members)
        return model.members[0]
    return model


def test_the_jobs_carry_attributes_to_the_candidates(night):
    work, _ = night
    model = load_model(work / "model")
    net = _network(model)
    assert model.n_feature_values == 4 + 3  # 4 groups, 3 tags
    assert (work / "model" / ITEM_FEATURE_FILES["item_feature_values"]).is_file()
    manifest = json.loads((work / "features" / "manifest.json").read_text())
    assert manifest["item_features"]["items_without_features"] == 0
    assert manifest["item_features"]["cold_items"] == COLD and manifest["item_features"]["dropped"] == {
        "not_in_catalogue": 0}
    item_map = pl.read_parquet(work / "features" / "item_map.parquet")
    assert item_map.height == manifest["n_items"] == model.n_items
    assert item_map.sort("item_id").tail(COLD)["train_count"].to_list() == [0] * COLD
    # a cold item is in the catalogue, scored by its attributes alone (its id row is not used)
    assert net.item_id_weights is not None and net.item_id_weights[-COLD:].tolist() == [0.0] * COLD
    # the candidates are the exact top 5 of the model's scores (attributes included), seen items excluded
    seqs = pl.read_parquet(work / "features" / "sequences.parquet").sort("user_idx").head(8)
    histories = [t + v + s for t, v, s in seqs.select("train_items", "val_items", "test_items").rows()]
    with torch.no_grad():
        scores = model.scores(pad_lists(histories, model.max_len))
    scores[:, 0] = -torch.inf
    for row, history in enumerate(histories):
        scores[row, history] = -torch.inf
    top = scores.topk(5).indices.tolist()
    users = pl.read_parquet(work / "features" / "user_map.parquet")
    items = dict(pl.read_parquet(work / "features" / "item_map.parquet").select("item_idx", "item_id").iter_rows())
    candidates = pl.read_parquet(work / "candidates" / f"date={DAY}" / "candidates.parquet")
    for user_idx, expected in zip(seqs["user_idx"], top, strict=True):
        user_id = users.filter(pl.col("user_idx") == user_idx)["user_id"].item()
        got = candidates.filter(pl.col("user_id") == user_id).sort("rank")["item_id"].to_list()
        assert got == [items[i] for i in expected]
    # the MLflow pyfunc model, loaded from the model directory alone, serves the same lists
    served = mlflow.pyfunc.load_model(str(work / "model")).predict(
        pd.DataFrame({"history": [[items[i] for i in h] for h in histories]}), params={"k": 5})
    assert [list(x) for x in served["item_ids"]] == [[items[i] for i in expected] for expected in top]


def test_warm_start_matches_values_night_over_night(night, tmp_path):
    work, model = night
    tomorrow = tmp_path / "work"
    shutil.copytree(work / "features", tomorrow / "features")
    items = _item_file(work / "features", tmp_path / "items.csv", shift=1)  # every item in another group
    init = f"train.init_from={work / 'model'}"
    args = [*tiny(tomorrow), *_attributes(items), init, "train.max_epochs=1", *model]
    assert main(["features", "--quiet", *args]) == EXIT_OK
    assert main(["train", "--quiet", *args]) == EXIT_OK
    report = json.loads((tomorrow / "model" / "train_report.json").read_text())
    # last night's catalogue (its cold items included) carried over; COLD more new items tonight
    assert report["warm_start"]["items_from_source"] == report["n_items"] - COLD
    assert report["warm_start"]["items_new"] == COLD
    assert (report["warm_start"]["values_from_source"], report["warm_start"]["values_new"]) == (7, 0)
    new = _network(load_model(tomorrow / "model"))
    shifted = pl.read_parquet(tomorrow / "features" / "item_features.parquet")
    old = pl.read_parquet(work / "features" / "item_features.parquet")
    assert not shifted.equals(old) and new.n_feature_values == 7  # same values, other items have them
    assert torch.equal(new.item_feature_ids[1:].sort(1).values,
                       pad_lists(shifted.sort("item_idx")["feature_idx"].to_list(), new.item_feature_ids.shape[1])
                       .sort(1).values)


def test_a_model_with_attributes_cannot_start_one_without(night, tmp_path, capsys):
    work, model = night
    tomorrow = tmp_path / "work"
    shutil.copytree(work / "features", tomorrow / "features")
    code = main(["train", "--quiet", *tiny(tomorrow), "model.item_features=false",
                 f"train.init_from={work / 'model'}", *model])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "trained with item attributes" in err and "without them" in err
    assert not (tomorrow / "model").exists()


def test_bad_item_file_is_exit_3_and_a_missing_one_exit_2(tmp_path, capsys):
    bad = tmp_path / "items.csv"
    bad.write_text("item_id,genre\n1,a\n")
    work = tmp_path / "work"
    assert main(["features", "--quiet", *tiny(work), *_attributes(bad)]) == 3
    assert "column 'group' (data.item_features.columns) not found" in capsys.readouterr().err
    assert main(["features", "--quiet", *tiny(work), *_attributes(tmp_path / "none.csv")]) == EXIT_USAGE
    assert "data.item_features.path" in capsys.readouterr().err
    assert not (work / "features").exists()


def test_the_features_run_tracks_the_attribute_accounting(tiny_features, tmp_path):
    from mlflow import MlflowClient

    items = _item_file(tiny_features, tmp_path / "items.csv")
    work = tmp_path / "work"
    try:
        assert main(["features", "--quiet", *tiny(work), *_attributes(items), "tracking.enabled=true"]) == EXIT_OK
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    section = json.loads((work / "features" / "manifest.json").read_text())["item_features"]
    metrics = run.data.metrics
    assert metrics["item_features.rows_in"] == section["rows_in"]
    assert metrics["item_features.cold_items"] == COLD
    assert metrics["item_features.n_values.group"] == 4 and metrics["item_features.n_values.tags"] == 3
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "features")}
    assert "features/item_feature_values.parquet" in artifacts
