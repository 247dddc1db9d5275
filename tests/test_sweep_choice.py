"""benchmarks.sweep --best: the seeds' configuration is chosen on validation NDCG@10 only, per dataset."""

import json
from pathlib import Path

import pytest

from benchmarks.sweep import best_lines


def _results(path: Path, rows: list[tuple[str, str, float, float]], seeds: list[int] | None = None) -> Path:
    with path.open("w") as f:
        for i, (tag, dataset, val, test) in enumerate(rows):
            seed = seeds[i] if seeds else 42 + sum(r[0] == tag for r in rows[:i])  # 42, 43, ... per tag
            f.write(json.dumps({"tag": tag, "dataset": dataset, "seed": seed, "train": {"best_val_ndcg_at_10": val},
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


def test_best_lines_compare_on_the_seeds_every_line_finished_and_refuse_a_seed_twice(tmp_path: Path) -> None:
    """Line b finished seed 42 only: it is compared with a on seed 42, not with a's mean over 42-44 (a single
    lucky seed used to beat a line whose three seeds averaged lower)."""
    sweep = tmp_path / "s.txt"
    sweep.write_text("a ds\nb ds\n")
    seeds = [42, 43, 44, 42]
    rows = [("a", "ds", 0.185, 0.0), ("a", "ds", 0.215, 0.0), ("a", "ds", 0.210, 0.0), ("b", "ds", 0.200, 0.0)]
    # a's mean over its three seeds is 0.2033 > b's 0.200, but on seed 42, the one both finished, b is better
    assert best_lines(sweep, _results(tmp_path / "r.jsonl", rows, seeds), 1) == ["b ds"]
    rows[0] = ("a", "ds", 0.205, 0.0)
    assert best_lines(sweep, _results(tmp_path / "r.jsonl", rows, seeds), 1) == ["a ds"]
    with pytest.raises(SystemExit, match="a seed 42 comes twice"):
        best_lines(sweep, _results(tmp_path / "t.jsonl", rows, [42, 42, 44, 42]), 1)
    with pytest.raises(SystemExit, match="share no finished seed"):
        best_lines(sweep, _results(tmp_path / "p.jsonl", rows, [43, 44, 45, 42]), 1)


def test_best_lines_refuse_results_of_another_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "s.txt"
    sweep.write_text("a ds1\n")
    results = _results(tmp_path / "r.jsonl", [("zz", "ds1", 0.3, 0.1)])
    with pytest.raises(SystemExit, match="no record of any tag"):
        best_lines(sweep, results, 1)


def test_candidates_are_scored_on_validation_only_and_the_chosen_ones_on_test_by_resuming() -> None:
    from benchmarks.sweep import arg_parser, command

    sweep = arg_parser().parse_args(["s.txt", "--json-out", "r.jsonl", "--set", "train.patience=20"])
    cmd = command("a", "ml-1m", ["model.n_blocks=5"], "42", sweep)
    assert "--no-test" in cmd and "--resume" not in cmd
    assert cmd[-2:] == ["train.patience=20", "model.n_blocks=5"]  # the line's own overrides last
    chosen = arg_parser().parse_args(["chosen.txt", "--json-out", "c.jsonl", "--test", "--resume"])
    cmd = command("a", "ml-1m", [], "42", chosen)
    assert "--no-test" not in cmd and "--resume" in cmd


def test_rank_shows_test_only_for_configurations_scored_on_it(tmp_path: Path) -> None:
    from benchmarks.sweep import rank

    path = tmp_path / "r.jsonl"
    rows = [{"tag": "a", "dataset": "d", "seed": 42, "overrides": [], "results": {},
             "train": {"best_val_ndcg_at_10": 0.2, "best_epoch": 1, "epochs_run": 2}},
            {"tag": "b", "dataset": "d", "seed": 42, "overrides": ["x=1"],
             "results": {"model": {"ndcg_at_10": 0.19, "hr_at_10": 0.3}},
             "train": {"best_val_ndcg_at_10": 0.1, "best_epoch": 1, "epochs_run": 2}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = rank([path]).splitlines()
    assert " a " in a and "test" not in a and " b " in b and "test 0.1900 / 0.3000" in b
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    with pytest.raises(SystemExit, match="a seed comes twice"):
        rank([path])
