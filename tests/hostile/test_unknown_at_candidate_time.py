"""Features rebuilt after training hold items and a user the model never saw: ``recsys candidates`` still
succeeds, never recommends an unknown item, counts them in the manifest and serves the unknown user."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipelines.cli import EXIT_OK
from tests.hostile.cli_run import half_written, run_cli

TINY = [
    "model.hidden=8", "model.max_len=8", "model.n_blocks=1", "train.max_epochs=1", "train.progress=false",
    "train.batch_size=32", "train.accelerator=cpu", "candidates.k=3", "candidates.recall_sample=5",
    "candidates.date=2024-01-01",
]  # fmt: skip


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_items_unknown_to_the_model_are_counted_not_recommended(tmp_path: Path, capsys):
    trained_on = [f"{u},{(u + t) % 12 + 1},{t}" for u in range(1, 21) for t in range(6)]  # items 1..12
    new_items = [f"{u},{100 + t},{10 + t}" for u in (1, 2) for t in range(2)]  # items 100, 101
    new_user = [f"99,101,{t}" for t in range(3)]  # only an unknown item in the history
    v1 = _write(tmp_path / "v1.csv", trained_on)
    v2 = _write(tmp_path / "v2.csv", trained_on + new_items + new_user)
    work = tmp_path / "work"
    common = ["--quiet", f"work_dir={work}", "tracking.enabled=false", *TINY]
    for job, data in (("features", v1), ("train", v1), ("features", v2), ("candidates", v2)):
        outcome = run_cli(capsys, job, *common, f"data.path={data}")
        assert outcome.code == EXIT_OK, f"{job}: {outcome.err}"
        assert "Traceback" not in outcome.console
    partition = work / "candidates" / "date=2024-01-01"
    manifest = json.loads((partition / "manifest.json").read_text())
    assert (manifest["unknown_items"], manifest["users_unknown_to_model"]) == (2, 1)
    candidates = pl.read_parquet(partition / "candidates.parquet")
    model_items = pl.read_parquet(work / "model" / "item_map.parquet")["item_id"]
    assert candidates["item_id"].is_in(model_items.implode()).all()
    assert candidates.group_by("user_id").len()["len"].to_list() == [3] * 21
    assert half_written(work) == []
