"""The whole job: features → train → evaluate → candidates."""

from __future__ import annotations

from pathlib import Path

from pipelines import build_features, evaluate, generate_candidates, train
from recsys.config import Config


def run(cfg: Config) -> Path:
    """Run every job in order with the same config; returns the work directory."""
    for job in (build_features, train, evaluate, generate_candidates):
        job.run(cfg)
    return Path(cfg.work_dir)
