"""Text ids (data.user_id_type / data.item_id_type: string) end to end, against the same events with
whole-number ids.

Oracle: renamed ``u000042`` / ``sku-000007``, the ids sort as text in the order their numbers sort, so the
feature job gives every user and item the same internal index, training on the CPU is deterministic, and every
output of the text run equals the whole-number run's with the ids renamed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import polars as pl
import pytest

from features.synthetic import generate_events
from pipelines.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from recsys.config import SyntheticConfig
from tests.pipelines.conftest import same_weights, weights

DAY, NEXT = "2024-09-01", "2024-09-02"
TINY = ["data.source=file", "model.max_len=20", "model.hidden=16", "model.n_blocks=1", "train.max_epochs=3",
        "train.progress=false", "tracking.enabled=false", "candidates.k=5", "candidates.recall_sample=20",
        "evaluate.baselines=[popularity]"]
TEXT = ["data.user_id_type=string", "data.item_id_type=string"]


def user_text(col: str = "user_id") -> pl.Expr:
    return pl.format("u{}", pl.col(col).cast(pl.String).str.zfill(6))


def item_text(col: str = "item_id") -> pl.Expr:
    return pl.format("sku-{}", pl.col(col).cast(pl.String).str.zfill(6))


def args(work: Path, events: Path, *extra: str) -> list[str]:
    return [f"work_dir={work}", f"data.path={events}", *TINY, *extra]


def night(work: Path, day: str = DAY) -> pl.DataFrame:
    return pl.read_parquet(work / "candidates" / f"date={day}" / "candidates.parquet")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("string-ids")
    events = generate_events(SyntheticConfig(n_users=200, n_items=50, seed=5)).select(
        "user_id", "item_id", "timestamp")
    events.write_csv(root / "int.csv")
    events.with_columns(user_text(), item_text()).write_csv(root / "text.csv")
    assert main(["run", "--quiet", "--run-date", DAY, *args(root / "int", root / "int.csv")]) == EXIT_OK
    assert main(["run", "--quiet", "--run-date", DAY, *args(root / "text", root / "text.csv", *TEXT)]) == EXIT_OK
    return {"root": root, "int": root / "int", "text": root / "text"}


def test_text_ids_give_the_same_model_metrics_and_candidates(runs):
    users = pl.read_parquet(runs["text"] / "features" / "user_map.parquet")
    items = pl.read_parquet(runs["text"] / "features" / "item_map.parquet")
    assert users.schema["user_id"] == pl.String and items.schema["item_id"] == pl.String
    int_items = pl.read_parquet(runs["int"] / "features" / "item_map.parquet")
    assert items.equals(int_items.with_columns(item_text()))  # same index for every item
    assert same_weights(weights(runs["int"]), weights(runs["text"]))
    report = {name: json.loads((runs[name] / "evaluation" / "report.json").read_text()) for name in ("int", "text")}
    assert report["text"]["model"] == report["int"]["model"]
    assert report["text"]["popularity"] == report["int"]["popularity"]
    text, ints = night(runs["text"]), night(runs["int"])
    assert text.schema["user_id"] == pl.String and text.schema["item_id"] == pl.String
    assert text.height == 5 * 200
    assert text.equals(ints.with_columns(user_text(), item_text()))


def test_text_ids_shard_into_the_whole_night(runs, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(runs["text"] / "features", work / "features")
    shutil.copytree(runs["text"] / "model", work / "model")
    parts = []
    for i in range(3):
        assert main(["candidates", "--quiet", "--date", DAY, "--shard", f"{i}/3",
                     *args(work, runs["root"] / "text.csv", *TEXT)]) == EXIT_OK
        parts.append(pl.read_parquet(work / "candidates" / f"shard={i}-of-3" / f"date={DAY}" / "candidates.parquet"))
    assert all(p.height > 0 for p in parts)  # the text hash spreads 200 users over 3 shards
    union = pl.concat(parts).sort(["user_id", "rank"])
    assert union.equals(night(runs["text"]))


def test_pyfunc_takes_and_returns_text_ids(runs):
    model = mlflow.pyfunc.load_model(str(runs["text"] / "model"))
    assert model.metadata.get_input_schema().to_dict()[0]["items"]["type"] == "string"
    seq = pl.read_parquet(runs["text"] / "features" / "sequences.parquet").join(
        pl.read_parquet(runs["text"] / "features" / "user_map.parquet"), on="user_idx").sort("user_id").head(20)
    items = pl.read_parquet(runs["text"] / "features" / "item_map.parquet")
    to_id = dict(zip(items["item_idx"].to_list(), items["item_id"].to_list(), strict=True))
    histories = [[to_id[i] for i in t + v + s] for t, v, s in
                 zip(seq["train_items"].to_list(), seq["val_items"].to_list(), seq["test_items"].to_list(),
                     strict=True)]
    got = model.predict(pd.DataFrame({"history": histories}), params={"k": 5})
    want = night(runs["text"]).filter(pl.col("user_id").is_in(seq["user_id"].implode()))
    assert [list(x) for x in got["item_ids"]] == want.group_by("user_id", maintain_order=True).agg("item_id")[
        "item_id"].to_list()
    unknown = model.predict(pd.DataFrame({"history": [["not-an-item"]]}), params={"k": 3})
    popular = items.sort(["train_count", "item_id"], descending=[True, False])["item_id"].head(3).to_list()
    assert list(unknown["item_ids"][0]) == popular
    # a missing-value marker in a request ('None', a NaN turned into 'nan') is no item, left out like an unknown
    # id, not an error failing the whole batch (the features job refuses it as an id of the events)
    marked = model.predict(pd.DataFrame({"history": [[*histories[0], "None", "nan", "\\N"]]}), params={"k": 5})
    assert list(marked["item_ids"][0]) == list(got["item_ids"][0])


def test_allow_list_of_text_ids(runs, tmp_path):
    # Oracle: the whole-number run with the same allow list in numbers.
    ids = pl.read_parquet(runs["int"] / "features" / "item_map.parquet")["item_id"].gather([0, 7, 14, 21, 28, 35])
    lists = {"int": pl.DataFrame({"item_id": [*ids.to_list(), 10**9]}),
             "text": pl.DataFrame({"item_id": ids}).select(item_text()).vstack(pl.DataFrame({"item_id": ["nope"]}))}
    got = {}
    for name, extra in (("int", []), ("text", TEXT)):
        work = tmp_path / name
        shutil.copytree(runs[name] / "features", work / "features")
        shutil.copytree(runs[name] / "model", work / "model")
        lists[name].write_csv(tmp_path / f"{name}.csv")
        assert main(["candidates", "--quiet", "--date", DAY, f"candidates.allowed_items={tmp_path / f'{name}.csv'}",
                     *args(work, runs["root"] / f"{name}.csv", *extra)]) == EXIT_OK
        got[name] = night(work)
        manifest = json.loads((work / "candidates" / f"date={DAY}" / "manifest.json").read_text())
        assert manifest["items_allowed"] == 6 and manifest["allowed_items_unknown"] == 1
    assert set(got["text"]["item_id"]) == set(lists["text"]["item_id"].head(6))  # "nope" is in no list
    assert got["text"].equals(got["int"].with_columns(user_text(), item_text()))


def test_a_whole_number_model_serves_text_features(runs, tmp_path):
    """data.*_id_type changed from int to string: last night's model, its candidates and a warm start still
    line up, through the ids' decimal text ("42")."""
    work = tmp_path / "work"
    decimal = ["data.user_id_type=string", "data.item_id_type=string"]
    assert main(["features", "--quiet", *args(work, runs["root"] / "int.csv", *decimal)]) == EXIT_OK
    items = pl.read_parquet(work / "features" / "item_map.parquet")
    numbers = pl.read_parquet(runs["int"] / "features" / "item_map.parquet")["item_id"].to_list()
    assert items["item_id"].to_list() == sorted(str(i) for i in numbers)  # text order: "1", "11", "112", …
    assert items["item_id"].to_list() != [str(i) for i in numbers]  # so the indices differ from the model's
    # yesterday's whole-number night, and tonight's lists from yesterday's whole-number model
    shutil.copytree(runs["int"] / "candidates" / f"date={DAY}", work / "candidates" / f"date={DAY}")
    assert main(["candidates", "--quiet", "--date", NEXT, f"candidates.model={runs['int'] / 'model'}",
                 *args(work, runs["root"] / "int.csv", *decimal)]) == EXIT_OK
    ints = night(runs["int"]).with_columns(pl.col("user_id", "item_id").cast(pl.String))
    assert night(work, NEXT).equals(ints.sort(["user_id", "rank"]))
    drift = json.loads((work / "candidates" / f"date={NEXT}" / "drift.json").read_text())
    assert drift["mean_overlap_at_k"] == 1.0 and drift["new_items"] == 0 and drift["users_lost"] == 0
    # a warm start from the same model finds every item by its id
    assert main(["train", "--quiet", f"train.init_from={runs['int'] / 'model'}", "train.max_epochs=1",
                 *args(work, runs["root"] / "int.csv", *decimal)]) == EXIT_OK
    report = json.loads((work / "model" / "train_report.json").read_text())
    assert report["warm_start"]["items_from_source"] == 50 and report["warm_start"]["items_new"] == 0


def test_a_text_model_cannot_serve_whole_number_features(runs, tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["features", "--quiet", *args(work, runs["root"] / "int.csv")]) == EXIT_OK
    code = main(["candidates", "--quiet", "--date", DAY, f"candidates.model={runs['text'] / 'model'}",
                 *args(work, runs["root"] / "int.csv")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "data.item_id_type" in err and "'sku-000001'" in err
    assert not (work / "candidates" / f"date={DAY}").exists()


def test_ids_written_as_floats_under_text_ids_are_not_served_as_a_night_of_fallbacks(runs, tmp_path, capsys):
    """A CSV whose item ids pandas wrote as `42.0`, switched to data.item_id_type=string: the text '42.0' is
    not the whole-number model's 42, so it knew none of the items: every user fell back to popularity, seen items
    went unexcluded, and the night was published with exit 0 (logged at INFO only)."""
    work = tmp_path / "work"
    floats = runs["root"] / "float-ids.csv"
    pl.read_csv(runs["root"] / "int.csv").with_columns(pl.col("item_id").cast(pl.Float64)).write_csv(floats)
    assert floats.read_text().splitlines()[1].split(",")[1].endswith(".0")
    decimal = ["data.item_id_type=string"]
    assert main(["features", "--quiet", *args(work, floats, *decimal)]) == EXIT_OK
    capsys.readouterr()
    code = main(["candidates", "--quiet", "--date", NEXT, f"candidates.model={runs['int'] / 'model'}",
                 *args(work, floats, *decimal)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "the model knows none of the features' 50 item ids" in err and ".0'" in err, err
    assert not (work / "candidates").exists() or not any((work / "candidates").glob("date=*"))


def test_blank_text_id_is_bad_input(tmp_path, capsys):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,2\n  ,c,3\n")
    assert main(["features", "--quiet", *args(tmp_path / "work", path, *TEXT)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "'user_id' (data.user_col)" in err and "data row 3" in err and "ids must not be blank" in err
