"""Night-over-night drift on hand-made lists with a known answer, and the gate's thresholds."""

from __future__ import annotations

import polars as pl
import pytest

from recsys.config import CandidatesConfig
from recsys.drift import drift_report, drift_violations


def _lists(rows: dict[int, list[int]]) -> pl.DataFrame:
    data = [(u, i, float(-r), r) for u, items in rows.items() for r, i in enumerate(items, start=1)]
    return pl.DataFrame(data, schema={"user_id": pl.Int64, "item_id": pl.Int64, "score": pl.Float32,
                                      "rank": pl.Int32}, orient="row")


PREVIOUS = _lists({1: [1, 2, 3], 2: [4, 5, 6], 3: [7, 8, 9]})
TODAY = _lists({1: [1, 2, 10], 2: [6, 5, 4], 4: [1, 11, 12]})


def test_drift_against_the_previous_night():
    report = drift_report(TODAY, PREVIOUS, k=3)
    assert report["users_common"] == 2 and report["users_lost"] == 1 and report["users_gained"] == 1
    assert report["mean_overlap_at_k"] == pytest.approx((2 / 3 + 1.0) / 2)  # order within the list is ignored
    assert report["new_items"] == 3  # 10, 11, 12 of the 8 distinct items today
    assert report["new_item_share"] == pytest.approx(3 / 8)


def test_only_the_top_k_counts():
    report = drift_report(TODAY, PREVIOUS, k=1)
    assert report["mean_overlap_at_k"] == pytest.approx((1.0 + 0.0) / 2)  # user 1: 1 vs 1; user 2: 6 vs 4


def test_first_night_has_no_drift_and_never_fails():
    report = drift_report(TODAY, None, k=3)
    assert report["users_today"] == 3 and report["mean_overlap_at_k"] is None
    assert drift_violations(report, CandidatesConfig(min_overlap=1.0, max_new_item_share=0.0)) == []


@pytest.mark.parametrize(
    "min_overlap, max_share, n_violations",
    [(None, None, 0), (0.8, None, 0), (0.9, None, 1), (0.5, 0.4, 0), (None, 0.3, 1), (0.9, 0.3, 2)],
)
def test_gate_thresholds(min_overlap, max_share, n_violations):
    report = drift_report(TODAY, PREVIOUS, k=3)  # mean overlap 0.833, new item share 0.375
    cfg = CandidatesConfig(min_overlap=min_overlap, max_new_item_share=max_share)
    assert len(drift_violations(report, cfg)) == n_violations


@pytest.mark.parametrize("today", [{}, {3: [6, 5, 4], 4: [3, 2, 1]}])  # an empty night; every user re-keyed
def test_a_night_with_no_user_in_common_fails_the_overlap_gate(today):
    previous = _lists({1: [1, 2, 3], 2: [4, 5, 6]})
    report = drift_report(_lists(today) if today else previous.clear(), previous, 3)
    assert report["users_common"] == 0 and report["mean_overlap_at_k"] is None
    violations = drift_violations(report, CandidatesConfig(min_overlap=0.5))
    assert len(violations) == 1 and "no user in common with the previous night (2 users then" in violations[0]
    assert drift_violations(report, CandidatesConfig()) == []  # no threshold: nothing to fail


def test_users_whose_text_id_names_no_single_user_tonight_are_lost_not_merged():
    # The previous night had text user ids; tonight data.user_id_type is int. "07" and "7" both parse as 7
    # (which of them is tonight's user 7 cannot be told), "u9" parses as nothing: all three are lost, and 8
    # is still matched. The previous night's items all count for the new-item share, unmatched users' too.
    previous = _lists({1: [1, 2, 3]}).drop("user_id").join(
        pl.DataFrame({"user_id": ["07", "7", "u9", "8"]}), how="cross").select("user_id", "item_id", "score", "rank")
    previous = previous.with_columns(
        pl.when(pl.col("user_id") == "u9").then(pl.col("item_id") + 10).otherwise(pl.col("item_id"))
        .alias("item_id"))
    today = _lists({7: [1, 2, 3], 8: [1, 2, 4], 9: [11, 12, 13]})
    report = drift_report(today, previous, k=3)
    assert report["users_previous"] == 4 and report["users_unmatched"] == 3
    assert report["users_common"] == 1 and report["users_lost"] == 3 and report["users_gained"] == 2
    assert report["mean_overlap_at_k"] == pytest.approx(2 / 3)  # user 8 only
    assert report["new_items"] == 1  # 4; 11-13 were on u9's list
    assert report["new_item_share"] == pytest.approx(1 / 7)


def test_text_item_ids_that_become_one_number_count_one_hit():
    """Previous night with text item ids '7', '07', '007' (data.item_id_type: string), tonight whole numbers:
    all three are item 7, and the join counted user 1's hit on it three times (overlap 1.0, not 1/3)."""
    s = {"user_id": pl.Int64, "item_id": pl.Int64, "score": pl.Float32, "rank": pl.Int32}
    today = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [7, 8, 9], "score": [0.0] * 3, "rank": [1, 2, 3]},
                         schema=s)
    previous = pl.DataFrame({"user_id": ["1"] * 3, "item_id": ["7", "07", "007"], "score": [0.0] * 3,
                             "rank": [1, 2, 3]}, schema={**s, "user_id": pl.String, "item_id": pl.String})
    assert drift_report(today, previous, 3)["mean_overlap_at_k"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("k_previous, k_tonight", [(50, 100), (100, 50)])
def test_a_changed_k_compares_the_shorter_lists_not_a_drift(k_previous, k_tonight):
    """candidates.k raised from 50 to 100 with the same ranking: tonight's items at ranks 51-100 were counted as
    new and the overlap divided by 100 (0.5), so an unchanged night failed the gate."""
    ranking = {u: list(range(1 + u, 201 + u)) for u in range(1, 6)}
    previous = _lists({u: items[:k_previous] for u, items in ranking.items()})
    today = _lists({u: items[:k_tonight] for u, items in ranking.items()})
    report = drift_report(today, previous, k=k_tonight)
    assert report["k"] == k_tonight and report["k_previous"] == k_previous and report["k_compared"] == 50
    assert report["mean_overlap_at_k"] == 1.0 and report["new_items"] == 0
    assert drift_violations(report, CandidatesConfig(min_overlap=0.99, max_new_item_share=0.0)) == []
    shifted = _lists({u: items[10:10 + k_tonight] for u, items in ranking.items()})  # a real change still counts
    moved = drift_report(shifted, previous, k=k_tonight)
    assert moved["mean_overlap_at_k"] == pytest.approx(40 / 50)
    assert "mean overlap@50 0.8000" in drift_violations(moved, CandidatesConfig(min_overlap=0.9))[0]


def test_overlap_of_lists_of_unequal_length_is_over_the_longer_list():
    """A user whose list is shorter one night (fewer unseen items left, a fallback): |today ∩ previous| over
    the longer of the two lists, as documented; over today's length a shorter list that is a subset scored 1."""
    report = drift_report(_lists({1: [1, 2], 2: [4, 5, 6]}), _lists({1: [1, 2, 3], 2: [4, 5]}), k=3)
    assert report["mean_overlap_at_k"] == pytest.approx((2 / 3 + 2 / 3) / 2)
