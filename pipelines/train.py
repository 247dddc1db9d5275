"""Training job: Lightning SASRec on the feature job's sequences; saves and registers the model."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

from features import schema
from features.artifacts import load_features
from pipelines.schedule import checkpoint_dir, today_utc
from pipelines.workdir import WorkDir
from recsys.config import Config, save_config
from recsys.faults import fault_point
from recsys.model import save_model
from recsys.storage import atomic_dir, write_json
from recsys.tracking import job_run
from recsys.training import check_compile_toolchain, resolve_hardware, train_model

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None) -> Path:
    """Train, then write ``<work_dir>/model`` atomically: weights, id maps, config and ``train_report.json``,
    which holds the registered model version (registered before the directory is renamed into place).

    With a ``run_date`` (a scheduled run) training resumes from ``checkpoint_dir(cfg, run_date)`` if a crash
    left a resume point there; without one it starts from scratch.
    """
    # A GPU asked for but missing, or compiling on a CPU without a C++ compiler: fail before reading anything.
    accelerator, _ = resolve_hardware(cfg.train.accelerator, cfg.train.precision)
    check_compile_toolchain(cfg.train.compile, accelerator)
    wd = WorkDir.of(cfg)
    feats = load_features(wd.features)
    ckpt_dir = checkpoint_dir(cfg, run_date or today_utc())
    if run_date is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    with job_run(cfg, "train") as tracker:
        result = train_model(cfg, feats.sequences, feats.n_items, ckpt_dir, logger=tracker.lightning_logger())
        report = {
            "best_val_ndcg_at_10": result.best_val_ndcg,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "resumed_from_epoch": result.resumed_from_epoch,
            "wall_time_s": result.wall_time_s,
            "seconds_per_epoch": result.seconds_per_epoch,
            "train_seconds_per_epoch": result.train_seconds_per_epoch,
            "history": result.history,
            "n_items": feats.n_items,
            "n_users": feats.n_users,
            "features_manifest": str(wd.features / schema.FEATURE_FILES["manifest"]),
            "checkpoint": str(result.best_checkpoint),
        }
        tracker.log_metrics({k: v for k, v in report.items() if isinstance(v, int | float)})
        with atomic_dir(wd.model) as tmp:
            save_model(result.model, tmp)
            fault_point("model-write")
            for name in ("user_map", "item_map"):
                shutil.copy2(wd.features / schema.FEATURE_FILES[name], tmp / schema.FEATURE_FILES[name])
            save_config(cfg, tmp / "config.yaml")
            tracker.log_artifacts(tmp, "model")
            report["registered_version"] = tracker.register_model("model")
            write_json(tmp / "train_report.json", report)
            tracker.log_artifact(tmp / "train_report.json", "model")
    log.info("train: best val NDCG@10 %.4f at epoch %d (%d epochs, %.1f s) → %s",
             result.best_val_ndcg, result.best_epoch, result.epochs_run, result.wall_time_s, wd.model)
    return wd.model
