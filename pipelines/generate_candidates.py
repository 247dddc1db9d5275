"""Candidate job: a model (local or from the MLflow registry) scores the users of the current features;
top-K per user goes to the date partition ``<work_dir>/candidates/date=YYYY-MM-DD/``, with a manifest and
a drift report against the previous night."""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from pathlib import Path
from typing import Any

from features import schema
from features.artifacts import FeatureSet, load_features
from pipelines.workdir import WorkDir
from recsys.candidates import TrainedModel, generate_candidates, load_trained_model, read_candidates
from recsys.config import Config, save_config
from recsys.drift import DriftError, drift_report, drift_violations
from recsys.faults import fault_point
from recsys.registry import ModelRef, describe_version, fetch_model, is_mlflow_uri
from recsys.storage import atomic_dir, fingerprint, read_json, write_json
from recsys.tracking import JobRun, job_run

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None) -> Path:
    """Write the partition of ``candidates.date`` (else ``run_date``, else today UTC) atomically (a rerun
    replaces it) and return it.

    Raises DriftError when the drift gate fails: the lists then go to ``candidates/rejected/date=…`` for
    inspection and the published partition of that date, if any, is left as it was.
    """
    wd = WorkDir.of(cfg)
    day = cfg.candidates.date or run_date or dt.datetime.now(dt.UTC).date()
    feats = load_features(wd.features)
    spec = cfg.candidates.model or str(wd.model)
    # A local model is read before an MLflow run is opened, so a missing one fails at once.
    local = None if is_mlflow_uri(spec) else load_trained_model(spec)
    with job_run(cfg, "candidates", tags={"candidates.date": day}) as tracker, \
            tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        trained, ref = _resolve_model(cfg, spec, local, tracker, Path(tmp))
        table, stats = generate_candidates(trained, feats, cfg.candidates)
        fault_point("candidates-scored")
        previous = wd.previous_candidates(day)
        drift = drift_report(table, read_candidates(previous) if previous else None, stats["k_effective"])
        violations = drift_violations(drift, cfg.candidates)
        drift = {"date": day.isoformat(), "previous": str(previous) if previous else None, **drift,
                 "passed": not violations, "violations": violations}
        manifest = _manifest(cfg, day, table.height, stats, ref, feats, wd)
        target = wd.rejected_candidates(day) if violations else wd.candidates_partition(day)
        with atomic_dir(target) as out:
            table.write_parquet(out / "candidates.parquet")
            fault_point("candidates-parquet-written")
            write_json(out / "manifest.json", manifest)
            write_json(out / "drift.json", drift)
            fault_point("candidates-manifest-written")
            save_config(cfg, out / "config.yaml")
            fault_point("candidates-before-publish")
        fault_point("candidates-published")
        _track(tracker, manifest, drift, target)
        if violations:
            raise DriftError(f"candidates for {day} not published: " + "; ".join(violations)
                             + f" (against {previous}); the lists are in {target} for inspection")
    log.info("candidates: %d rows for %d users (%d fallbacks) → %s",
             table.height, stats["users"], stats["fallback_users"], target)
    return target


def _resolve_model(
    cfg: Config, spec: str, local: TrainedModel | None, tracker: JobRun, tmp: Path
) -> tuple[TrainedModel, ModelRef]:
    """The model of ``spec``: ``local`` (already loaded) or downloaded from MLflow into ``tmp``."""
    if local is None:
        ref, files = fetch_model(tracker, spec, tmp)
        return load_trained_model(files), ref
    report_path = Path(spec) / "train_report.json"
    version = read_json(report_path).get("registered_version") if report_path.is_file() else None
    version = None if version is None else str(version)
    return local, describe_version(tracker, str(Path(spec).resolve()), cfg.tracking.registered_model, version)


def _manifest(cfg: Config, day: dt.date, rows: int, stats: dict[str, Any], ref: ModelRef, feats: FeatureSet,
              wd: WorkDir) -> dict[str, Any]:
    c = cfg.candidates
    return {
        "date": day.isoformat(),
        "rows": rows,
        **{k: v for k, v in stats.items() if k != "search"},
        "k": c.k,
        "model": ref.to_dict(),
        "index": {"factory": c.index, "nprobe": c.nprobe, "ef_search": c.ef_search,
                  "exclude_seen": c.exclude_seen},
        "search": stats["search"],
        "features": {
            "dir": str(wd.features.resolve()),
            "manifest": fingerprint(wd.features / schema.FEATURE_FILES["manifest"]),
            "inputs": feats.manifest.get("inputs"),
            "n_users": feats.n_users,
            "n_items": feats.n_items,
        },
    }


def _track(tracker: JobRun, manifest: dict[str, Any], drift: dict[str, Any], target: Path) -> None:
    model = manifest["model"]
    tracker.set_tags({**{f"model.{k}": v for k, v in model.items()}, "drift.passed": drift["passed"]})
    numbers = {k: v for k, v in {**manifest, **manifest["search"]}.items() if isinstance(v, int | float)}
    numbers |= {f"drift/{k}": v for k, v in drift.items() if isinstance(v, int | float) and k != "passed"}
    tracker.log_metrics(numbers)
    for name in ("manifest.json", "drift.json"):
        tracker.log_artifact(target / name, f"candidates/{target.name}")
