"""Training job: Lightning SASRec on the feature job's sequences; saves and registers the model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from features import schema
from features.artifacts import load_features
from pipelines.workdir import WorkDir
from recsys.config import Config, save_config
from recsys.model import save_model
from recsys.storage import atomic_dir, write_json
from recsys.tracking import job_run
from recsys.training import train_model

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    """Train, write ``<work_dir>/model`` atomically (weights, id maps, config, report), register it."""
    wd = WorkDir.of(cfg)
    feats = load_features(wd.features)
    with job_run(cfg, "train") as tracker:
        result = train_model(cfg, feats.sequences, feats.n_items, wd.root, logger=tracker.lightning_logger())
        report = {
            "best_val_ndcg_at_10": result.best_val_ndcg,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "wall_time_s": result.wall_time_s,
            "seconds_per_epoch": result.seconds_per_epoch,
            "n_items": feats.n_items,
            "n_users": feats.n_users,
            "features_manifest": str(wd.features / schema.FEATURE_FILES["manifest"]),
        }
        with atomic_dir(wd.model) as tmp:
            save_model(result.model, tmp)
            for name in ("user_map", "item_map"):
                shutil.copy2(wd.features / schema.FEATURE_FILES[name], tmp / schema.FEATURE_FILES[name])
            save_config(cfg, tmp / "config.yaml")
            write_json(tmp / "train_report.json", report)
        tracker.log_metrics({k: v for k, v in report.items() if isinstance(v, int | float)})
        tracker.log_artifacts(wd.model, "model")
        version = tracker.register_model("model")
        if version is not None:
            report["registered_version"] = version
            write_json(wd.model / "train_report.json", report)
    log.info("train: best val NDCG@10 %.4f at epoch %d (%d epochs, %.1f s) → %s",
             result.best_val_ndcg, result.best_epoch, result.epochs_run, result.wall_time_s, wd.model)
    return wd.model
