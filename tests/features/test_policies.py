"""Row policies on hand-made tables with known results, and the accounting invariant."""

from __future__ import annotations

import polars as pl
import pytest

from features.policies import DROP_REASONS, apply_policies, filter_kcore
from features.synthetic import generate_events
from recsys.config import ConfigError, FeaturesConfig, SyntheticConfig


def _events(rows: list[tuple[int, int, int, str | None]]) -> pl.LazyFrame:
    """Rows (user, item, timestamp, event_type) plus ``tag`` = input position, to see which copy is kept."""
    users, items, stamps, kinds = zip(*rows, strict=True)
    return pl.LazyFrame(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": stamps,
            "event_type": kinds,
            "tag": range(len(rows)),
        },
        schema_overrides={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "timestamp": pl.Int64,
            "event_type": pl.String,
        },
    )


ROWS = [
    (1, 5, 3, "view"),  # 0
    (1, 5, 3, "view"),  # 1: exact duplicate of 0
    (1, 5, 1, "click"),  # 2: earliest (1, 5)
    (1, 6, 2, None),  # 3
    (2, 5, 1, "view"),  # 4
    (2, 7, 1, "view"),  # 5
    (1, 5, 1, "view"),  # 6: user, item and timestamp of 2 but another type: another event, not a copy
    (1, 5, 1, "click"),  # 7: exact duplicate of 2 (later in the input)
]


@pytest.mark.parametrize(
    ("features", "kept_tags", "dropped"),
    [
        (FeaturesConfig(dedup="none"), [0, 1, 2, 3, 4, 5, 6, 7], {}),
        (FeaturesConfig(dedup="exact"), [0, 2, 3, 4, 5, 6], {"duplicate": 2}),
        (FeaturesConfig(dedup="user_item"), [2, 3, 4, 5], {"duplicate": 4}),
        (FeaturesConfig(dedup="none", event_types=("view",)), [0, 1, 4, 5, 6], {"event_type_filtered": 3}),
        # the filter runs first, so the earliest *kept* (1, 5) is row 6, not the filtered click in row 2
        (
            FeaturesConfig(dedup="user_item", event_types=("view",)),
            [4, 5, 6],
            {"event_type_filtered": 3, "duplicate": 2},
        ),
    ],
    ids=["none", "exact", "user_item", "event_filter", "filter_then_user_item"],
)
def test_policies_keep_the_expected_rows(features, kept_tags, dropped):
    kept, accounting = apply_policies(_events(ROWS), features)
    assert kept["tag"].to_list() == kept_tags
    assert {k: v for k, v in accounting.dropped.items() if v} == dropped
    assert set(accounting.dropped) == set(DROP_REASONS)
    assert accounting.rows_in == len(ROWS) == accounting.rows_kept + sum(accounting.dropped.values())


def test_kcore_iterates_until_stable():
    # pass 1 drops user 4 (1 event) and item 3 (1 event); that leaves user 3 with one event, dropped in pass 2
    rows = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (3, 1), (4, 4)]
    events = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64}, orient="row")
    kept, dropped = filter_kcore(events, min_user=2, min_item=2)
    assert list(kept.iter_rows()) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert dropped == {"user_kcore": 2, "item_kcore": 1}
    again, none = filter_kcore(kept, min_user=2, min_item=2)
    assert again.equals(kept) and none == {"user_kcore": 0, "item_kcore": 0}


@pytest.mark.parametrize(
    "features",
    [
        FeaturesConfig(),
        FeaturesConfig(dedup="user_item", min_user_events=20, min_item_events=30),
        FeaturesConfig(event_types=("view", "click"), dedup="exact", min_user_events=15, min_item_events=40),
    ],
)
def test_rows_in_equals_kept_plus_dropped(features):
    events = generate_events(SyntheticConfig(n_users=300, n_items=200, duplicate_rate=0.05, seed=3))
    kept, accounting = apply_policies(events.lazy(), features)
    assert accounting.rows_in == events.height
    assert accounting.rows_kept == kept.height
    assert accounting.rows_in == accounting.rows_kept + sum(accounting.dropped.values())
    if features.min_user_events > 1:
        assert 0 < kept.height < events.height
        assert kept.group_by("user_id").len()["len"].min() >= features.min_user_events
        assert kept.group_by("item_id").len()["len"].min() >= features.min_item_events


def test_event_type_filter_needs_an_event_type_column():
    events = _events(ROWS).drop("event_type")
    with pytest.raises(ConfigError, match="data.event_type_col"):
        apply_policies(events, FeaturesConfig(event_types=("view",)))
