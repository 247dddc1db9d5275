"""Row policies with accounting: event-type filter, history window, de-duplication, per-user limits (too active
users, only the newest events) and the iterative k-core.

Every dropped row is counted under exactly one reason of :data:`DROP_REASONS`, so
``rows_in == rows_kept + sum(dropped.values())`` always holds. The event-type filter and de-duplication only
*mark* rows (column ``drop_reason``, null = kept) on the rows sorted by user and time (:func:`mark_rows`);
:func:`select_rows` then runs the k-core eagerly because it loops until stable. De-duplicating sorted rows
is cheap: identical rows share (user, timestamp), so they sit in one run of equal (user, timestamp) and only
rows in such runs (a few percent) need hashing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from features.schema import EVENT_TYPE, ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from recsys.config import ConfigError, FeaturesConfig

logger = logging.getLogger(__name__)

DROP_REASON = "drop_reason"
DROP_REASONS = ("event_type_filtered", "older_than_history", "duplicate", "user_too_active", "older_than_last_n",
                "user_kcore", "item_kcore")
_REASON = pl.Enum(DROP_REASONS)  # cheaper to fill and filter than String
_ROW = "_row"  # input position, to restore input order
MAX_TYPES_SEEN = 1000  # an event type column holds a handful of kinds; a wrong column is not held whole
_DEDUP_KEYS = {"exact": [USER_ID, ITEM_ID, TIMESTAMP], "user_item": [USER_ID, ITEM_ID]}


@dataclass(frozen=True)
class Accounting:
    """Row counts of the policies; ``dropped`` has every key of :data:`DROP_REASONS`."""

    rows_in: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    # with features.event_types: those of its types some row in has, and the distinct event types of the rows in
    # (the first MAX_TYPES_SEEN by name), to name a listed type that matches no event: a typo filters every event
    # of the type the user meant
    types_matched: frozenset[str] = frozenset()
    types_in: frozenset[str] = frozenset()

    def __add__(self, other: Accounting) -> Accounting:
        """The accounting of two disjoint sets of rows taken together (e.g. two user ranges)."""
        dropped = {key: self.dropped.get(key, 0) + other.dropped.get(key, 0) for key in DROP_REASONS}
        return Accounting(self.rows_in + other.rows_in, self.rows_kept + other.rows_kept, dropped,
                          self.types_matched | other.types_matched,
                          frozenset(sorted(self.types_in | other.types_in)[:MAX_TYPES_SEEN]))

    def unmatched_types(self, features: FeaturesConfig) -> list[str]:
        """The types of ``features.event_types`` that no row in has."""
        return [] if features.event_types is None else sorted(set(features.event_types) - self.types_matched)


def _kept() -> pl.Expr:
    return pl.col(DROP_REASON).is_null()


def _mark(condition: pl.Expr, reason: str) -> pl.Expr:
    """Set ``drop_reason`` to ``reason`` where ``condition`` holds and the row is not dropped already."""
    return (
        pl.when(_kept() & condition)
        .then(pl.lit(reason, _REASON))
        .otherwise(pl.col(DROP_REASON))
        .alias(DROP_REASON)
    )


def start_marking(events: pl.LazyFrame) -> pl.LazyFrame:
    """Add an all-null ``drop_reason`` column (every row kept)."""
    return events.with_columns(pl.lit(None, _REASON).alias(DROP_REASON))


def mark_event_types(events: pl.LazyFrame, event_types: Sequence[str] | None) -> pl.LazyFrame:
    """Mark rows whose ``event_type`` is not in ``event_types`` (a null type too); None keeps all rows.

    Raises ConfigError if ``event_types`` is set but the events have no ``event_type`` column.
    """
    if event_types is None:
        return events
    if EVENT_TYPE not in events.collect_schema().names():
        raise ConfigError(
            "features.event_types is set but the events have no event_type column; set data.event_type_col (read "
            "by data.format csv and parquet; the other formats have no event types)"
        )
    allowed = pl.col(EVENT_TYPE).is_in(list(event_types)).fill_null(False)
    return events.with_columns(_mark(~allowed, "event_type_filtered"))


def sort_by_user_time(events: pl.DataFrame) -> pl.DataFrame:
    """Rows ordered by ``user_id``, each user's rows by ``timestamp``; ties keep their input order.

    Two stable one-key sorts, by time then by user, give that order. They run eagerly on purpose: in a lazy
    plan polars merges them into one two-key sort, which took about twice as long (polars 2.1, 25M rows);
    input in rough time order, as logs are, also makes the first sort cheap.
    """
    events = events.sort(TIMESTAMP, maintain_order=True)  # rebinding frees the input copy early
    return events.sort(USER_ID, maintain_order=True)


def mark_duplicates(events: pl.LazyFrame, dedup: str) -> pl.LazyFrame:
    """Mark all but the first kept row of each key as ``duplicate``; expects :func:`sort_by_user_time` order.

    ``exact``: identical rows, key (user_id, item_id, timestamp) plus event_type and weight where the events
    have them (a buy in the same second as its view is another event, not a copy); ``user_item``: key
    (user_id, item_id), keeping the earliest timestamp, ties broken by input order; ``none``: nothing
    marked. Rows already dropped are ignored. In that order "first" means earliest, then first in the input,
    so the sort makes both rules "first row of the key".
    """
    if dedup == "none":
        return events
    user, stamp = pl.col(USER_ID), pl.col(TIMESTAMP)
    if dedup == "exact":
        # copies share (user, timestamp): only rows in a run of equal (user, timestamp) can be duplicates,
        # and hashing just those (null elsewhere) keeps the hash table small
        same_prev = (user == user.shift(1)) & (stamp == stamp.shift(1))
        same_next = (user == user.shift(-1)) & (stamp == stamp.shift(-1))
        candidate = (same_prev | same_next).fill_null(False)
    else:
        candidate = pl.lit(True)
    columns = _DEDUP_KEYS[dedup]
    if dedup == "exact":
        columns = columns + [name for name in (EVENT_TYPE, WEIGHT) if name in events.collect_schema()]
    key = pl.when(candidate).then(pl.struct(*columns, _kept()))
    return events.with_columns(_mark(candidate & ~key.is_first_distinct(), "duplicate"))


def mark_history(events: pl.LazyFrame, since: int | None) -> pl.LazyFrame:
    """Mark rows with a timestamp before ``since`` ``older_than_history`` (features.max_history_age: the window
    of recent history the features keep); None keeps all rows."""
    if since is None:
        return events
    return events.with_columns(_mark(pl.col(TIMESTAMP) < since, "older_than_history"))


def mark_user_limits(events: pl.LazyFrame, max_user_events: int | None, keep_last: int | None) -> pl.LazyFrame:
    """Per user, on the rows still kept and in :func:`sort_by_user_time` order: every row of a user with more
    than ``max_user_events`` of them is marked ``user_too_active`` (bots, crawlers, shared accounts); then all
    but each user's newest ``keep_last`` rows are marked ``older_than_last_n``. None = no limit."""
    if max_user_events is not None:
        count = _kept().cast(pl.Int64).sum().over(USER_ID)
        events = events.with_columns(_mark(count > max_user_events, "user_too_active"))
    if keep_last is not None:  # kept rows at or after this one (newer, or tied and later in the input)
        newer = _kept().cast(pl.Int64).cum_sum(reverse=True).over(USER_ID)
        events = events.with_columns(_mark(newer > keep_last, "older_than_last_n"))
    return events


def mark_rows(events: pl.LazyFrame, features: FeaturesConfig, since: int | None = None) -> pl.DataFrame:
    """``events`` in :func:`sort_by_user_time` order, ``drop_reason`` set by the event-type filter, the history
    window (rows before ``since``), dedup and the per-user limits."""
    # the in-memory engine: the streaming one (polars 2.1) sorts about twice as slowly, in no less memory
    typed = events.pipe(start_marking).pipe(mark_event_types, features.event_types).pipe(mark_history, since)
    ordered = sort_by_user_time(typed.collect(engine="in-memory"))
    return (ordered.lazy().pipe(mark_duplicates, features.dedup)
            .pipe(mark_user_limits, features.max_user_events, features.keep_last_events)
            .collect(engine="in-memory"))


def filter_kcore(events: pl.DataFrame, min_user: int, min_item: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """Drop users with < ``min_user`` events and items with < ``min_item`` events, repeated until stable.

    Returns the kept rows (input order) and ``{"user_kcore": n, "item_kcore": m}`` dropped row counts.
    """
    dropped = {"user_kcore": 0, "item_kcore": 0}
    if min_user <= 1 and min_item <= 1:
        return events, dropped
    while True:
        before = events.height
        events = events.filter(pl.len().over(USER_ID) >= min_user)
        dropped["user_kcore"] += before - events.height
        middle = events.height
        events = events.filter(pl.len().over(ITEM_ID) >= min_item)
        dropped["item_kcore"] += middle - events.height
        if events.height == before:
            return events, dropped


def select_rows(events: pl.LazyFrame, features: FeaturesConfig, since: int | None = None
                ) -> tuple[pl.DataFrame, Accounting]:
    """Event-type filter, history window (``since``), dedup and per-user limits (:func:`mark_rows`), then the
    k-core.

    Returns the kept rows in :func:`sort_by_user_time` order, which the split needs, and the accounting.
    """
    marked = mark_rows(events, features, since)
    counts = marked.filter(~_kept()).group_by(DROP_REASON).len()
    dropped = dict.fromkeys(DROP_REASONS, 0) | dict(counts.iter_rows())
    kept, kcore_dropped = filter_kcore(
        marked.filter(_kept()).drop(DROP_REASON), features.min_user_events, features.min_item_events
    )
    matched: frozenset[str] = frozenset()
    types_in: frozenset[str] = frozenset()
    if features.event_types is not None:  # mark_rows checked the column exists
        types = marked[EVENT_TYPE].drop_nulls().unique().cast(pl.String)
        matched = frozenset(types.filter(types.is_in(list(features.event_types))).to_list())
        types_in = frozenset(types.sort().head(MAX_TYPES_SEEN).to_list())
    accounting = Accounting(rows_in=marked.height, rows_kept=kept.height, dropped=dropped | kcore_dropped,
                            types_matched=matched, types_in=types_in)
    logger.info(
        "policies: %d rows in, %d kept, dropped %s",
        accounting.rows_in,
        accounting.rows_kept,
        accounting.dropped,
    )
    return kept, accounting


def apply_policies(events: pl.LazyFrame, features: FeaturesConfig, since: int | None = None
                   ) -> tuple[pl.DataFrame, Accounting]:
    """:func:`select_rows` with the kept rows back in input order."""
    kept, accounting = select_rows(events.with_row_index(_ROW), features, since)
    return kept.sort(_ROW).drop(_ROW), accounting
