"""The whole job: features → train → evaluate → candidates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pipelines import build_features, evaluate, generate_candidates, train
from recsys.config import Config


def run(cfg: Config, run_date: dt.date | None = None) -> Path:
    """Run every job in order with the same config; returns the work directory.

    ``run_date`` ties training's resume point to the run (see ``pipelines.schedule.checkpoint_dir``) and is
    the reference of ``features.max_event_age``.
    """
    build_features.run(cfg, run_date)
    train.run(cfg, run_date)
    evaluate.run(cfg)
    generate_candidates.run(cfg, run_date)
    return Path(cfg.work_dir)
