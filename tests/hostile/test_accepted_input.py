"""Odd but valid input is accepted, with the rules the README states, and every dropped row is accounted:
negative and far-future timestamps, ids up to 2**63-1, users with one event, duplicates, blank lines."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from pipelines.cli import EXIT_OK
from tests.hostile.cli_run import Outcome, features_argv, half_written, run_cli

HEADER = "user_id,item_id,timestamp\n"
YEAR_3000 = 32503680000  # 3000-01-01T00:00:00Z in epoch seconds


def _build(tmp_path: Path, capsys, content: str | bytes, *overrides: str) -> tuple[Outcome, Path]:
    path = tmp_path / "events.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    work = tmp_path / "work"
    outcome = run_cli(capsys, *features_argv(work, path, *overrides))
    assert outcome.code == EXIT_OK, outcome.err
    assert "Traceback" not in outcome.console
    assert half_written(work) == []
    return outcome, work / "features"


def _manifest(features: Path) -> dict:
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["rows_in"] == manifest["rows_kept"] + sum(manifest["dropped"].values())
    return manifest


def _sequences_by_id(features: Path) -> dict[int, tuple[list[int], list[int], list[int]]]:
    """user_id -> (train, val, test) lists of ITEM ids, read back through the id maps."""
    items = dict(pl.read_parquet(features / "item_map.parquet").select("item_idx", "item_id").iter_rows())
    users = dict(pl.read_parquet(features / "user_map.parquet").select("user_idx", "user_id").iter_rows())
    out = {}
    for user_idx, *lists in pl.read_parquet(features / "sequences.parquet").iter_rows():
        out[users[user_idx]] = tuple([items[i] for i in part] for part in lists)
    return out


def test_negative_timestamps_are_valid_epoch_values(tmp_path, capsys):
    # before 1970; given out of order to show they are ordered, not rejected
    _, features = _build(tmp_path, capsys, HEADER + "1,30,-4\n1,20,-5\n1,40,-3\n1,10,-86400\n")
    assert _sequences_by_id(features) == {1: ([10, 20], [30], [40])}
    assert pl.read_parquet(features / "events.parquet")["timestamp"].min() == -86400


@pytest.mark.parametrize(
    "stamps",
    [(1700000000, YEAR_3000, YEAR_3000 + 1), ("2023-11-14T22:13:20", "3000-01-01T00:00:00Z", "3000-01-02")],
    ids=["epoch_seconds", "iso_8601"],
)
def test_future_timestamps_are_kept_with_a_warning(tmp_path, capsys, stamps):
    text = HEADER + f"1,10,{stamps[0]}\n1,30,{stamps[2]}\n1,20,{stamps[1]}\n"
    outcome, features = _build(tmp_path, capsys, text)
    assert _sequences_by_id(features) == {1: ([10], [20], [30])}
    for expected in ("WARNING", "column 'timestamp'", "2 timestamp(s) lie in the future", "year 3000"):
        assert expected in outcome.err


def test_millisecond_timestamps_warn_about_the_unit(tmp_path, capsys):
    outcome, _ = _build(tmp_path, capsys, HEADER + "1,2,1700000000000\n1,3,1700000000001\n")
    assert "If they are milliseconds" in outcome.err


def test_ids_up_to_int64_max_round_trip_exactly(tmp_path, capsys):
    big = 2**62
    text = HEADER + f"{big},{big + 1},1\n{big},{2**63 - 1},2\n-7,{big + 1},3\n"
    _, features = _build(tmp_path, capsys, text)
    assert pl.read_parquet(features / "user_map.parquet")["user_id"].to_list() == [-7, big]
    assert pl.read_parquet(features / "item_map.parquet")["item_id"].to_list() == [big + 1, 2**63 - 1]


def test_user_with_one_event_is_kept_in_train_only(tmp_path, capsys):
    _, features = _build(tmp_path, capsys, HEADER + "1,2,3\n2,3,4\n2,4,5\n2,5,6\n")
    manifest = _manifest(features)
    assert (manifest["n_users"], manifest["n_users_with_val"], manifest["n_users_with_test"]) == (2, 1, 1)
    assert _sequences_by_id(features)[1] == ([2], [], [])
    assert manifest["rows_kept"] == manifest["rows_in"] == 4


def test_duplicated_events_are_an_accounted_drop(tmp_path, capsys):
    _, features = _build(tmp_path, capsys, HEADER + "1,2,3\n1,2,3\n1,3,4\n1,2,3\n1,4,5\n")
    manifest = _manifest(features)
    assert manifest["dropped"]["duplicate"] == 2
    assert (manifest["rows_in"], manifest["rows_kept"]) == (5, 3)


def test_blank_lines_hold_no_event_and_are_skipped(tmp_path, capsys):
    _, features = _build(tmp_path, capsys, HEADER + "1,2,3\n\n1,3,4\n1,4,5\n\n\n")
    assert _manifest(features)["rows_in"] == 3
    assert _sequences_by_id(features) == {1: ([2], [3], [4])}


def test_byte_order_mark_and_crlf_line_ends(tmp_path, capsys):
    text = "\ufeff" + (HEADER + "1,2,3\n1,3,4\n1,4,5\n").replace("\n", "\r\n")
    _, features = _build(tmp_path, capsys, text.encode("utf-8"))
    assert _sequences_by_id(features) == {1: ([2], [3], [4])}
