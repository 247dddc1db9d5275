"""Feature job: events → validated, filtered, encoded sequences and splits (Polars)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from features.build import build_features
from features.schema import ITEM_FEATURE_FILES
from pipelines.workdir import WorkDir
from recsys.config import Config
from recsys.tracking import job_run

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None) -> Path:
    """Build features into ``<work_dir>/features`` and track the run; returns that directory. ``run_date``
    (default today, UTC) is the reference of ``features.max_event_age``."""
    out = WorkDir.of(cfg).features
    with job_run(cfg, "features") as tracker:
        manifest = build_features(cfg, run_date)
        dropped = {f"dropped.{k}": v for k, v in manifest["dropped"].items()}
        tracker.log_metrics(
            {
                "rows_in": manifest["rows_in"],
                "rows_kept": manifest["rows_kept"],
                "n_users": manifest["n_users"],
                "n_items": manifest["n_items"],
                **dropped,
                **_item_feature_metrics(manifest.get("item_features")),
            }
        )
        for name in ("manifest.json", "config.yaml", "user_map.parquet", "item_map.parquet",
                     ITEM_FEATURE_FILES["item_feature_values"]):
            if (out / name).is_file():  # the last only with data.item_features
                tracker.log_artifact(out / name, "features")
    if manifest.get("item_features"):
        section = manifest["item_features"]
        log.info("item attributes: %d rows in, %d used, dropped %s, %d duplicate rows merged; values %s; %d items "
                 "without any, %d new items", section["rows_in"], section["rows_used"], section["dropped"],
                 section["duplicate_item_rows"], section["n_values"], section["items_without_features"],
                 section["cold_items"])
    log.info(
        "features: %d rows in, %d kept, dropped %s; %d users, %d items → %s",
        manifest["rows_in"], manifest["rows_kept"], manifest["dropped"],
        manifest["n_users"], manifest["n_items"], out,
    )
    return out


def _item_feature_metrics(section: dict | None) -> dict[str, int]:
    """The item attribute accounting as MLflow metrics (``item_features.rows_in``, ...); none without it."""
    if not section:
        return {}
    counts = {k: section[k] for k in ("rows_in", "rows_used", "duplicate_item_rows", "items_with_features",
                                      "items_without_features", "cold_items")}
    counts |= {f"dropped.{k}": v for k, v in section["dropped"].items()}
    counts |= {f"n_values.{k}": v for k, v in section["n_values"].items()}
    return {f"item_features.{k}": v for k, v in counts.items()}
