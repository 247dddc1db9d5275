"""`recsys run` never serves a model that failed the promotion gate: the champion's lists go out instead."""

from __future__ import annotations

import polars as pl

from pipelines.cli import EXIT_OK, main
from recsys.storage import read_json
from tests.pipelines.conftest import tiny

TRACK = ["tracking.enabled=true", "tracking.registered_model=gated"]


def _night(work, date: str, *extra: str) -> None:
    assert main(["run", "--quiet", "--run-date", date, *tiny(work, *extra), *TRACK]) == EXIT_OK


def test_run_serves_the_champion_when_the_gate_keeps_the_new_model_out(tmp_path):
    work = tmp_path / "work"
    _night(work, "2024-05-01")
    first = work / "candidates" / "date=2024-05-01"
    model = read_json(first / "manifest.json")["model"]
    assert (model["uri"], model["version"]) == (str(work / "model"), "1")  # model/ itself: v1, promoted
    _night(work, "2024-05-02", "train.max_epochs=1", "train.lr=1e-12")  # an untrained model: v2
    decision = read_json(work / "evaluation" / "promotion.json")
    assert (decision["version"], decision["promoted"], decision["champion_version"]) == ("2", False, "1")
    night = work / "candidates" / "date=2024-05-02"
    model = read_json(night / "manifest.json")["model"]
    assert (model["uri"], model["version"], model["alias"]) == ("models:/gated@champion", "1", "champion")
    # the same features, the same v1: the lists of the first night, not those of the model the gate refused
    assert pl.read_parquet(night / "candidates.parquet").equals(pl.read_parquet(first / "candidates.parquet"))
