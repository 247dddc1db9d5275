"""Night-over-night drift of candidate lists, and the gate that refuses to publish a drifted night.

Both inputs are schema.CANDIDATES tables; only each user's top K (by ``rank``) counts, K the smaller of
tonight's K and the previous night's (its longest list): a night whose only change is a larger
``candidates.k`` (or allow list) compares its top 50 with last night's 50, not its 100 with them.

- overlap@K of a user present both nights = |today ∩ previous| / max(|today|, |previous|) (= / K for full
  lists); ``mean_overlap_at_k`` averages it over those users;
- ``new_item_share`` = distinct items in today's lists that are in no list of the previous night, over the
  distinct items in today's lists;
- ``users_lost`` / ``users_gained``: users with a list only the previous night / only today;
  ``users_unmatched`` of the lost had an id that names no single user under tonight's data.user_id_type.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from features import schema
from recsys.config import CandidatesConfig


class DriftError(RuntimeError):
    """Tonight's candidates drifted past ``candidates.min_overlap`` / ``candidates.max_new_item_share``."""


def drift_report(today: pl.DataFrame, previous: pl.DataFrame | None, k: int) -> dict[str, Any]:
    """Drift statistics of ``today`` against ``previous`` (None: no earlier night; statistics are null)."""
    users_today = today[schema.USER_ID].n_unique()
    if previous is None:
        return {"k": k, "k_previous": None, "k_compared": None, "users_today": users_today,
                "users_previous": None, "users_common": None, "users_lost": None, "users_unmatched": None,
                "users_gained": None, "mean_overlap_at_k": None, "new_items": None, "new_item_share": None}
    k_previous = previous["rank"].max()
    k_previous = None if k_previous is None else int(k_previous)  # type: ignore[arg-type]
    k_compared = k if k_previous is None else min(k, k_previous)
    a = _top(today, k_compared)
    # the previous night's ids in tonight's dtypes (data.*_id_type may have changed in between)
    top = schema.with_id_dtype(_top(previous, k_compared), schema.ITEM_ID, today.schema[schema.ITEM_ID])
    top = top.unique(maintain_order=True)  # text ids '7' and '07' of one list are one item 7 now: one hit, not two
    b, users_previous, users_unmatched = _matched_users(top, today.schema[schema.USER_ID])
    sizes_a = a.group_by(schema.USER_ID).len("n_today")
    sizes_b = b.group_by(schema.USER_ID).len("n_previous")
    hits = a.join(b, on=[schema.USER_ID, schema.ITEM_ID], how="inner").group_by(schema.USER_ID).len("hits")
    common = (
        sizes_a.join(sizes_b, on=schema.USER_ID, how="inner")
        .join(hits, on=schema.USER_ID, how="left")
        .select((pl.col("hits").fill_null(0) / pl.max_horizontal("n_today", "n_previous")).alias("overlap"))
    )
    items_today = a[schema.ITEM_ID].unique()
    new_items = int((~items_today.is_in(top[schema.ITEM_ID].unique().implode())).sum())  # every list counts
    return {
        "k": k,
        "k_previous": k_previous,
        "k_compared": k_compared,
        "users_today": users_today,
        "users_previous": users_previous,
        "users_common": common.height,
        "users_lost": sizes_b.join(sizes_a, on=schema.USER_ID, how="anti").height + users_unmatched,
        "users_unmatched": users_unmatched,
        "users_gained": sizes_a.join(sizes_b, on=schema.USER_ID, how="anti").height,
        "mean_overlap_at_k": float(common["overlap"].mean()) if common.height else None,
        "new_items": new_items,
        "new_item_share": new_items / items_today.len() if items_today.len() else None,
    }


def drift_violations(report: dict[str, Any], cfg: CandidatesConfig) -> list[str]:
    """Human-readable reasons the night fails the gate; empty = publish. No previous night never fails."""
    out = []
    overlap, share = report["mean_overlap_at_k"], report["new_item_share"]
    if cfg.min_overlap is not None and overlap is not None and overlap < cfg.min_overlap:
        out.append(f"mean overlap@{report['k_compared']} {overlap:.4f} < candidates.min_overlap {cfg.min_overlap}")
    elif cfg.min_overlap is not None and overlap is None and report["users_previous"]:
        # an empty night, or every user re-keyed: nothing to measure is not a pass
        out.append(f"no user in common with the previous night ({report['users_previous']} users then, "
                   f"{report['users_today']} tonight), so overlap@{report['k_compared']} cannot reach candidates.min_overlap "
                   f"{cfg.min_overlap}")
    if cfg.max_new_item_share is not None and share is not None and share > cfg.max_new_item_share:
        out.append(f"new item share {share:.4f} > candidates.max_new_item_share {cfg.max_new_item_share}")
    return out


def drift_gate(cfg: CandidatesConfig, has_previous: bool) -> str:
    """What the gate did tonight: ``off`` (no threshold set), ``no previous night`` (thresholds set but
    nothing to compare with: the night passes unchecked) or ``applied``."""
    if cfg.min_overlap is None and cfg.max_new_item_share is None:
        return "off"
    return "applied" if has_previous else "no previous night"


def _matched_users(lists: pl.DataFrame, dtype: pl.DataType) -> tuple[pl.DataFrame, int, int]:
    """The previous night's ``lists`` with user ids cast to tonight's ``dtype``, keeping only the users whose id
    names one user tonight; with the number of previous users and of those left unmatched. After a change of
    data.user_id_type a text id that is no number (``u7``) has no counterpart, and text ids that become one
    number (``7``, ``07``) cannot tell which of them tonight's user 7 is: both are lost, not merged into one."""
    ids = lists.select(schema.USER_ID).unique()
    cast = schema.with_id_dtype(ids, schema.USER_ID, dtype)[schema.USER_ID]
    matched = ids.with_columns(cast.alias("_tonight")).filter(cast.is_not_null() & ~cast.is_duplicated())
    kept = lists.join(matched, on=schema.USER_ID, how="inner").drop(schema.USER_ID)
    kept = kept.rename({"_tonight": schema.USER_ID}).select(lists.columns)
    return kept, ids.height, ids.height - matched.height


def _top(table: pl.DataFrame, k: int) -> pl.DataFrame:
    return table.filter(pl.col("rank") <= k).select(schema.USER_ID, schema.ITEM_ID)
