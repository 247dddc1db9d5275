"""A features job that rebuilds the feature set while `recsys train` runs cannot pair the new weights with the
other build's id maps: model/ carries the maps of the features the model was trained on."""

from __future__ import annotations

import shutil

import polars as pl

import pipelines.train as train_job
from features import schema
from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from tests.pipelines.conftest import tiny


def test_model_carries_the_id_maps_it_was_trained_with(tmp_path, tiny_features, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    trained_on = {name: pl.read_parquet(work / "features" / schema.FEATURE_FILES[name])
                  for name in ("user_map", "item_map")}
    train_model = train_job.train_model

    def rebuilt_while_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = train_model(*args, **kwargs)
        for name, table in trained_on.items():  # another build: the same ids, other indices
            table.with_columns(pl.col(table.columns[1]).reverse()).write_parquet(
                work / "features" / schema.FEATURE_FILES[name])
        return result

    monkeypatch.setattr(train_job, "train_model", rebuilt_while_training)
    assert main(["train", "--quiet", *tiny(work)]) == EXIT_OK
    for name, table in trained_on.items():
        assert pl.read_parquet(work / "model" / schema.FEATURE_FILES[name]).equals(table), name


def test_evaluate_refuses_a_model_trained_on_another_features_build(tmp_path, tiny_features, capsys):
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    assert main(["train", "--quiet", *tiny(work)]) == EXIT_OK
    assert main(["evaluate", "--quiet", *tiny(work)]) == EXIT_OK
    assert main(["features", "--quiet", *tiny(work, "data.synthetic.n_items=60")]) == EXIT_OK  # a new build
    capsys.readouterr()
    assert main(["evaluate", "--quiet", *tiny(work)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "was trained on other features: its item map (50 items)" in err and "(60 items)" in err
