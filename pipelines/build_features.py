"""Feature job: events → validated, filtered, encoded sequences and splits (Polars)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from features.build import build_features
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
            }
        )
        for name in ("manifest.json", "config.yaml", "user_map.parquet", "item_map.parquet"):
            tracker.log_artifact(out / name, "features")
    log.info(
        "features: %d rows in, %d kept, dropped %s; %d users, %d items → %s",
        manifest["rows_in"], manifest["rows_kept"], manifest["dropped"],
        manifest["n_users"], manifest["n_items"], out,
    )
    return out
