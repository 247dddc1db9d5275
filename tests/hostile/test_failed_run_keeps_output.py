"""A failed run after a good one leaves the good ``features/`` byte for byte as it was and nothing
half-written; with tracking on, the failed run is recorded as FAILED, still without a traceback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipelines.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE
from tests.hostile.cli_run import assert_user_error, features_argv, half_written, run_cli, snapshot

GOOD = "user_id,item_id,timestamp\n" + "".join(
    f"{u},{i},{t}\n" for u in (1, 2) for t, i in enumerate((5, 6, 7, 8))
)


@pytest.fixture
def built(tmp_path: Path, capsys) -> tuple[Path, Path, dict[str, bytes]]:
    """A work dir holding a good feature set: (work, good input, snapshot of features/)."""
    good = tmp_path / "good.csv"
    good.write_text(GOOD, encoding="utf-8")
    work = tmp_path / "work"
    assert run_cli(capsys, *features_argv(work, good)).code == EXIT_OK
    return work, good, snapshot(work / "features")


BAD_RUNS = {
    "bad_value": ("user_id,item_id,timestamp\n1,abc,3\n", (), EXIT_INPUT),
    "truncated_parquet": (b"PAR1\x15\x04", ("data.format=parquet",), EXIT_INPUT),
    "missing_path": (None, (), EXIT_USAGE),
    "bad_config": (GOOD, ("features.dedup=sometimes",), EXIT_USAGE),
    "kcore_leaves_nothing": (GOOD, ("features.min_item_events=3",), EXIT_INPUT),
}


@pytest.mark.parametrize("name", list(BAD_RUNS))
def test_failed_run_leaves_previous_features_unchanged(name: str, built, tmp_path: Path, capsys):
    work, _, before = built
    content, overrides, code = BAD_RUNS[name]
    path = tmp_path / "bad.input"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    outcome = run_cli(capsys, *features_argv(work, path, *overrides))
    assert_user_error(outcome, code)
    assert snapshot(work / "features") == before
    assert half_written(work) == []


def test_failed_pipeline_run_stops_before_training(tmp_path: Path, capsys):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,3\n1,,4\n", encoding="utf-8")
    work = tmp_path / "work"
    argv = features_argv(work, path)
    outcome = run_cli(capsys, "run", *argv[1:])
    assert_user_error(outcome, EXIT_INPUT, str(path), "'item_id'", "data row 2")
    for stage in ("features", "checkpoints", "model", "evaluation", "candidates"):
        assert not (work / stage).exists(), stage
    assert half_written(work) == []


def test_failed_run_with_tracking_is_recorded_as_failed(built, tmp_path: Path, capsys):
    work, _, before = built
    path = tmp_path / "bad.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,soon\n", encoding="utf-8")
    argv = [a for a in features_argv(work, path) if a != "tracking.enabled=false"]
    outcome = run_cli(capsys, *argv)
    assert_user_error(outcome, EXIT_INPUT, str(path), "'soon'")
    assert snapshot(work / "features") == before
    assert half_written(work) == []
    with sqlite3.connect(work / "mlflow.db") as db:
        runs = db.execute("SELECT name, status FROM runs").fetchall()
    assert runs == [("features", "FAILED")]


def test_job_without_its_upstream_artifact_is_a_usage_error(tmp_path: Path, capsys):
    work = tmp_path / "work"
    outcome = run_cli(capsys, "evaluate", "--quiet", f"work_dir={work}", "tracking.enabled=false")
    assert_user_error(outcome, EXIT_USAGE, str(work / "features"), "run `recsys features` first")
    assert not (work / "evaluation").exists()
    assert half_written(work) == []
