"""benchmarks.sweep --best: the seeds' configuration is chosen on validation NDCG@10 only, per dataset."""

import json
from pathlib import Path

import pytest

from benchmarks.sweep import best_lines


def _results(path: Path, rows: list[tuple[str, str, float, float]]) -> Path:
    with path.open("w") as f:
        for tag, dataset, val, test in rows:
            f.write(json.dumps({"tag": tag, "dataset": dataset, "train": {"best_val_ndcg_at_10": val},
                                "results": {"model": {"ndcg_at_10": test, "hr_at_10": test}}}) + "\n")
    return path


def test_best_lines_pick_the_highest_mean_validation_per_dataset_never_test(tmp_path: Path) -> None:
    sweep = tmp_path / "s.txt"
    sweep.write_text("# comment\na ds1 x=1\nb ds1 x=2 y=3\nc ds2\nd ds2 z=1\ne ds2 z=2  # never ran\n")
    # b has the best test but not the best validation mean; a's two seeds average above b.
    results = _results(tmp_path / "r.jsonl", [("a", "ds1", 0.30, 0.10), ("a", "ds1", 0.20, 0.10),
                                               ("b", "ds1", 0.24, 0.90), ("c", "ds2", 0.05, 0.0),
                                               ("d", "ds2", 0.06, 0.0)])
    assert best_lines(sweep, results, 1) == ["a ds1 x=1", "d ds2 z=1"]
    assert best_lines(sweep, results, 2) == ["a ds1 x=1", "b ds1 x=2 y=3", "d ds2 z=1", "c ds2"]


def test_best_lines_refuse_results_of_another_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "s.txt"
    sweep.write_text("a ds1\n")
    results = _results(tmp_path / "r.jsonl", [("zz", "ds1", 0.3, 0.1)])
    with pytest.raises(SystemExit, match="no record of any tag"):
        best_lines(sweep, results, 1)
