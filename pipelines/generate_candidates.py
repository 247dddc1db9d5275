"""Candidate job: user and item vectors from the trained model → FAISS top-K per user → Parquet."""

from __future__ import annotations

import logging
from pathlib import Path

from features.artifacts import load_features
from pipelines.workdir import WorkDir
from recsys.candidates import generate_candidates
from recsys.config import Config, save_config
from recsys.model import load_model
from recsys.storage import atomic_dir, write_json
from recsys.tracking import job_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    """Write ``<work_dir>/candidates/candidates.parquet`` and its manifest atomically."""
    wd = WorkDir.of(cfg)
    feats = load_features(wd.features)
    model = load_model(wd.model)
    with job_run(cfg, "candidates") as tracker:
        table, stats = generate_candidates(model, feats, cfg.candidates)
        manifest = {
            "rows": table.height,
            "users": table["user_id"].n_unique(),
            "search": stats,
            "k": cfg.candidates.k,
            "index": cfg.candidates.index,
            "model_dir": str(wd.model),
            "features_manifest": str(wd.features / "manifest.json"),
        }
        with atomic_dir(wd.candidates) as tmp:
            table.write_parquet(tmp / "candidates.parquet")
            write_json(tmp / "manifest.json", manifest)
            save_config(cfg, tmp / "config.yaml")
        tracker.log_metrics({k: v for k, v in {**manifest, **stats}.items() if isinstance(v, int | float)})
        tracker.log_artifact(wd.candidates / "manifest.json", "candidates")
    log.info("candidates: %d rows for %d users → %s", manifest["rows"], manifest["users"], wd.candidates)
    return wd.candidates
