"""Evaluation job: full-catalogue ranking metrics of the model and the popularity baseline."""

from __future__ import annotations

import logging
from pathlib import Path

from features.artifacts import load_features
from pipelines.workdir import WorkDir
from recsys.baselines import popularity_scores
from recsys.config import Config, save_config
from recsys.evaluation import evaluate_all
from recsys.model import load_model
from recsys.storage import atomic_dir, write_json
from recsys.tracking import job_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    """Evaluate on ``cfg.evaluate.split``; writes ``<work_dir>/evaluation/report.json``."""
    wd = WorkDir.of(cfg)
    feats = load_features(wd.features)
    model = load_model(wd.model)
    with job_run(cfg, "evaluate") as tracker:
        pop = popularity_scores(feats.sequences, feats.n_items)
        results = evaluate_all(model, feats.sequences, feats.n_items, pop, cfg.evaluate, model.max_len)
        report = {"split": cfg.evaluate.split, "ks": list(cfg.evaluate.ks), "model_dir": str(wd.model), **results}
        with atomic_dir(wd.evaluation) as tmp:
            write_json(tmp / "report.json", report)
            save_config(cfg, tmp / "config.yaml")
        for name, metrics in results.items():
            tracker.log_metrics({f"{cfg.evaluate.split}/{name}/{k}": v for k, v in metrics.items()})
        tracker.log_artifacts(wd.evaluation, "evaluation")
    log.info("evaluate: report → %s", wd.evaluation / "report.json")
    return wd.evaluation
