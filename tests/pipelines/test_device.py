"""`recsys evaluate` / `recsys candidates` with evaluate.device / candidates.device: auto without a GPU is the
CPU, gives what cpu gives, and the device used is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.cli import EXIT_OK, main
from recsys.storage import read_json
from tests.pipelines.conftest import tiny, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    return train_tiny(tmp_path_factory.mktemp("device") / "work", tiny_features)


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_evaluate_auto_is_the_cpu_and_scores_as_cpu_does(trained: Path) -> None:
    reports = {}
    for setting in ("auto", "cpu"):
        assert main(["evaluate", "--quiet", *tiny(trained), f"evaluate.device={setting}"]) == EXIT_OK
        reports[setting] = read_json(trained / "evaluation" / "report.json")
    assert reports["auto"]["device"] == "cpu"
    assert reports["auto"] == reports["cpu"]
    assert 0.0 < reports["auto"]["model"]["ndcg_at_10"] <= 1.0


def test_candidates_auto_is_the_cpu_and_writes_what_cpu_writes(trained: Path) -> None:
    nights = {}
    for setting, date in (("auto", "2024-05-01"), ("cpu", "2024-05-02")):
        argv = ["candidates", "--quiet", "--date", date, *tiny(trained), f"candidates.device={setting}"]
        assert main(argv) == EXIT_OK
        nights[setting] = trained / "candidates" / f"date={date}"
    manifests = {setting: read_json(night / "manifest.json") for setting, night in nights.items()}
    assert manifests["auto"]["device"] == manifests["cpu"]["device"] == "cpu"
    tables = {setting: (night / "candidates.parquet").read_bytes() for setting, night in nights.items()}
    assert tables["auto"] == tables["cpu"]
