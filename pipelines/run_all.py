"""The whole job: features → train → evaluate → candidates."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from pipelines import build_features, evaluate, generate_candidates, prune, train
from pipelines.schedule import today_utc
from pipelines.workdir import WorkDir
from recsys.config import Config
from recsys.registry import CHAMPION
from recsys.storage import read_json

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None) -> Path:
    """Run every job in order with the same config; returns the work directory.

    ``run_date`` ties training's resume point to the run (see ``pipelines.schedule.checkpoint_dir``) and is
    the reference of ``features.max_event_age``. Candidates come from the model that passed the gate: see
    :func:`served_model`. Once they are published, the MLflow store is pruned (``tracking.keep_days``; a failure
    there is a warning: the night stands).
    """
    build_features.run(cfg, run_date)
    train.run(cfg, run_date)
    evaluate.run(cfg)
    generate_candidates.run(served_model(cfg), run_date)
    prune.after_night(cfg, run_date or today_utc())
    return Path(cfg.work_dir)


def served_model(cfg: Config) -> Config:
    """``cfg`` for tonight's candidates: unchanged, unless ``candidates.model`` is unset (score ``model/``) and
    tonight's promotion gate kept the new version out; then the champion (``models:/<name>@champion``) is
    scored, so that a model that failed the gate never reaches the candidate lists."""
    decision = WorkDir.of(cfg).evaluation / "promotion.json"  # written by this run's evaluate, or absent
    if cfg.candidates.model is not None or not decision.is_file():
        return cfg
    promotion = read_json(decision)
    if promotion["promoted"]:
        return cfg
    uri = f"models:/{cfg.tracking.registered_model}@{CHAMPION}"
    log.warning("candidates: %s v%s stays challenger (%s); tonight's candidates come from %s (v%s), not %s",
                promotion["model"], promotion["version"], promotion["reason"], uri,
                promotion["champion_version"], WorkDir.of(cfg).model)
    return cfg.model_copy(update={"candidates": cfg.candidates.model_copy(update={"model": uri})})
