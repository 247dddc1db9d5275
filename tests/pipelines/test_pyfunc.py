"""The trained model directory loads with mlflow.pyfunc and recommends what `recsys candidates` does."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import polars as pl
import pytest

from pipelines.cli import EXIT_OK, main
from tests.pipelines.conftest import tiny, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    return train_tiny(tmp_path_factory.mktemp("pyfunc") / "work", tiny_features)


def test_pyfunc_gives_the_candidates_of_the_job(trained):
    # Oracle: the candidates job (exact Flat index) for every user, with its histories in original ids.
    assert main(["candidates", "--quiet", "--date", "2024-09-01", *tiny(trained)]) == EXIT_OK
    night = trained / "candidates" / "date=2024-09-01"
    expected = pl.read_parquet(night / "candidates.parquet")
    seq = pl.read_parquet(trained / "features" / "sequences.parquet")
    items = pl.read_parquet(trained / "features" / "item_map.parquet")
    users = pl.read_parquet(trained / "features" / "user_map.parquet")
    to_id = dict(zip(items["item_idx"].to_list(), items["item_id"].to_list(), strict=True))
    seq = seq.join(users, on="user_idx").sort("user_id")
    histories = [[to_id[i] for i in t + v + s] for t, v, s in
                 zip(seq["train_items"].to_list(), seq["val_items"].to_list(), seq["test_items"].to_list(),
                     strict=True)]

    model = mlflow.pyfunc.load_model(str(trained / "model"))
    got = model.predict(pd.DataFrame({"history": histories}), params={"k": 5})
    assert list(got.columns) == ["item_ids", "scores"] and len(got) == len(histories)
    want = expected.group_by("user_id", maintain_order=True).agg("item_id", "score")
    assert want["user_id"].to_list() == seq["user_id"].to_list()
    assert [list(x) for x in got["item_ids"]] == want["item_id"].to_list()
    for ours, theirs in zip(got["scores"], want["score"].to_list(), strict=True):
        assert list(ours) == pytest.approx(theirs, rel=1e-4, abs=1e-5)


def test_pyfunc_fallback_unknown_items_and_bad_input(trained):
    model = mlflow.pyfunc.load_model(str(trained / "model"))
    items = pl.read_parquet(trained / "model" / "item_map.parquet")
    popular = items.sort(["train_count", "item_id"], descending=[True, False])["item_id"].to_list()
    first = popular[0]
    got = model.predict(pd.DataFrame({"history": [[10**15], [], [first, 10**15]]}), params={"k": 3})
    assert list(got["item_ids"][0]) == popular[:3] and list(got["item_ids"][1]) == popular[:3]  # fallback
    assert first not in list(got["item_ids"][2]) and len(got["item_ids"][2]) == 3  # seen item excluded
    total = items["train_count"].sum()
    counts = dict(zip(items["item_id"].to_list(), items["train_count"].to_list(), strict=True))
    assert list(got["scores"][0]) == pytest.approx([counts[i] / total for i in popular[:3]])
    assert len(model.predict(pd.DataFrame({"history": [[first]]}))["item_ids"][0]) == 10  # default k
    with pytest.raises(Exception, match="history"):
        model.predict(pd.DataFrame({"items": [[first]]}))
    meta = json.loads(json.dumps(model.metadata.get_input_schema().to_dict()))
    assert meta[0]["name"] == "history"


def test_pyfunc_keeps_the_input_index_and_takes_an_empty_batch(trained):
    """`df.assign(recs=model.predict(df)["item_ids"])` aligns by index: the output has the input's (before:
    0..n-1, so a filtered frame got other users' lists); an empty batch is an empty frame (before: an error)."""
    model = mlflow.pyfunc.load_model(str(trained / "model"))
    a, b, c = pl.read_parquet(trained / "model" / "item_map.parquet")["item_id"].to_list()[:3]
    frame = pd.DataFrame({"user": ["x", "y", "z"], "history": [[a], [b], [c]]}).iloc[[2, 0]]  # index 2, 0
    got = model.predict(frame, params={"k": 4})
    assert list(got.index) == [2, 0]
    alone = {i: list(model.predict(pd.DataFrame({"history": [h]}), params={"k": 4})["item_ids"][0])
             for i, h in zip((2, 0), ([c], [a]), strict=True)}
    assigned = frame.assign(recs=got["item_ids"])
    assert {i: list(assigned.loc[i, "recs"]) for i in (2, 0)} == alone
    empty = model.predict(pd.DataFrame({"history": pd.Series([], dtype=object)}), params={"k": 4})
    assert len(empty) == 0 and list(empty.columns) == ["item_ids", "scores"]


def test_pyfunc_reads_ids_as_the_features_job_does(trained):
    """Ids as the features job reads them (text stripped, a number as text): the same lists as the plain ids,
    not the popularity fallback of an 'unknown' history; a value that is no id is an error naming it. Called
    in-process: through mlflow.pyfunc the signature (Array(long) for whole-number ids) refuses text first."""
    from recsys.candidates import load_trained_model
    from recsys.serving import Recommender

    model = Recommender(load_trained_model(trained / "model"))
    first, second = pl.read_parquet(trained / "model" / "item_map.parquet")["item_id"].to_list()[:2]
    plain = model.predict(pd.DataFrame({"history": [[first, second]]}), params={"k": 5})
    for spelled in ([f" {first} ", str(second)], [first, f"{second} "]):
        got = model.predict(pd.DataFrame({"history": [spelled]}), params={"k": 5})
        assert list(got["item_ids"][0]) == list(plain["item_ids"][0])
    # a missing value (pandas' NaN in a float list, 'None' or '' as text) is no item: left out, not an error
    for spelled in ([float(first), float(second), float("nan")], [str(first), str(second), "None", ""]):
        got = model.predict(pd.DataFrame({"history": [spelled]}), params={"k": 5})
        assert list(got["item_ids"][0]) == list(plain["item_ids"][0])
    with pytest.raises(Exception, match="'sku-9' is not one"):
        model.predict(pd.DataFrame({"history": [[first, "sku-9"]]}))


def test_without_mlflow_the_model_directory_is_written_without_mlmodel(tmp_path, monkeypatch, caplog):
    import sys

    from recsys.serving import write_mlmodel

    monkeypatch.setitem(sys.modules, "mlflow.pyfunc", None)  # `import mlflow.pyfunc` raises ImportError
    assert write_mlmodel(tmp_path) is False
    assert not (tmp_path / "MLmodel").exists() and "mlflow is not installed" in caplog.text
    monkeypatch.undo()
    assert write_mlmodel(tmp_path) is True and (tmp_path / "MLmodel").is_file()
