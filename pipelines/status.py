"""`recsys status`: where a work directory stands, read from the files the jobs write; changes nothing.

For the person on call at 7 a.m.: which night and config last succeeded, what the features, model and
evaluation say, which candidate nights are published or rejected, and which jobs are running now (their
locks). Reads no events and no MLflow server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.schedule import lock_holders
from pipelines.workdir import WorkDir, dated_partitions
from recsys.config import Config
from recsys.storage import read_json


def collect(cfg: Config) -> dict[str, Any]:
    """The status of ``cfg.work_dir`` as a JSON-ready dict (None where a job has not written yet)."""
    wd = WorkDir.of(cfg)
    return {
        "work_dir": str(wd.root.resolve()),
        "runs": _markers(wd.root / "runs"),
        "features": _features(wd.features / "manifest.json"),
        "model": _model(wd.model / "train_report.json"),
        "evaluation": _evaluation(wd.evaluation),
        "candidates": _candidates(wd.candidates),
        "running": lock_holders(wd.root),
    }


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _markers(runs: Path) -> dict[str, dict[str, Any]]:
    """Per scheduled job, its latest success marker (by run date)."""
    out = {}
    for job in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        dates = sorted(job.glob("*.json"))
        if dates:
            marker = read_json(dates[-1])
            out[job.name] = {"run_date": dates[-1].stem, "finished_at": marker.get("finished_at"),
                             "model_version": marker.get("model_version"), "config_hash": marker.get("config_hash")}
    return out


def _features(path: Path) -> dict[str, Any] | None:
    manifest = _read(path)
    if manifest is None:
        return None
    keys = ("created_at", "rows_in", "rows_kept", "n_users", "n_items", "newest_timestamp", "dropped")
    return {k: manifest.get(k) for k in keys}


def _model(path: Path) -> dict[str, Any] | None:
    report = _read(path)
    if report is None:
        return None
    keys = ("best_val_ndcg_at_10", "best_epoch", "epochs_run", "wall_time_s", "registered_version")
    return {k: report.get(k) for k in keys} | {"warm_start": (report.get("warm_start") or {}).get("uri")}


def _evaluation(directory: Path) -> dict[str, Any] | None:
    report = _read(directory / "report.json")
    if report is None:
        return None
    key = f"ndcg_at_{report['ks'][0]}"
    scorers = {name: metrics[key] for name, metrics in report.items() if isinstance(metrics, dict)}
    promotion = _read(directory / "promotion.json")
    return {"split": report["split"], "metric": key, "scores": scorers,
            "promotion": None if promotion is None else promotion.get("summary")}


def _candidates(root: Path) -> dict[str, Any]:
    """Published and rejected nights (whole or by shard) and the latest published night's manifest counts
    (summed over its shards)."""
    published = [*root.glob("date=*"), *root.glob("shard=*/date=*")]
    nights = sorted({when.isoformat() for when, _ in dated_partitions(published)})
    rejected = sorted({when.isoformat() for when, _ in dated_partitions(root.glob("rejected/**/date=*"))})
    latest = None
    if nights:
        day = nights[-1]
        manifests = [m for m in (root / f"date={day}" / "manifest.json", *root.glob(f"shard=*/date={day}/manifest.json"))
                     if m.is_file()]
        counts = [read_json(m) for m in manifests]
        latest = {"date": day, "parts": len(manifests), "rows": sum(c["rows"] for c in counts),
                  "users": sum(c["users"] for c in counts), "fallback_users": sum(c["fallback_users"] for c in counts),
                  "model_version": counts[0]["model"].get("version") if counts else None}
    return {"nights": nights, "rejected": rejected, "latest": latest}


def render(status: dict[str, Any]) -> str:
    """The status as lines of text."""
    lines = [f"work directory: {status['work_dir']}"]
    for job, marker in status["runs"].items():
        version = "" if marker["model_version"] is None else f", model version {marker['model_version']}"
        lines.append(f"  last success: recsys {job} for {marker['run_date']} at {marker['finished_at']}{version}")
    if not status["runs"]:
        lines.append("  last success: no success marker yet (recsys run / recsys train write them)")
    f = status["features"]
    lines.append("  features:    none yet" if f is None else
                 f"  features:    built {f['created_at']}: {f['rows_kept']} of {f['rows_in']} rows kept, "
                 f"{f['n_users']} users, {f['n_items']} items, newest event {f['newest_timestamp']}")
    m = status["model"]
    lines.append("  model:       none yet" if m is None else
                 f"  model:       best val NDCG@10 {m['best_val_ndcg_at_10']:.4f} at epoch {m['best_epoch']} of "
                 f"{m['epochs_run']} ({m['wall_time_s']:.0f} s), registered version {m['registered_version']}"
                 + (f", warm started from {m['warm_start']}" if m["warm_start"] else ""))
    e = status["evaluation"]
    if e is None:
        lines.append("  evaluation:  none yet")
    else:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in e["scores"].items())
        lines.append(f"  evaluation:  {e['split']} {e['metric']}: {scores}")
        if e["promotion"]:
            lines.append(f"  promotion:   {e['promotion']}")
    c = status["candidates"]
    latest = c["latest"]
    if latest is None:
        lines.append("  candidates:  no night published yet")
    else:
        lines.append(f"  candidates:  latest night {latest['date']} ({latest['parts']} part(s)): {latest['rows']} rows "
                     f"for {latest['users']} users, {latest['fallback_users']} fallbacks, model version "
                     f"{latest['model_version']}; {len(c['nights'])} nights published")
    if c["rejected"]:
        lines.append(f"  rejected:    nights {', '.join(c['rejected'])} (drift gate; under candidates/rejected/)")
    running = status["running"]
    lines.append("  running now: " + (", ".join(f"{job} (pid {pid})" for job, pid in running.items())
                                      if running else "nothing"))
    return "\n".join(lines)


def run(cfg: Config, as_json: bool = False) -> str:
    status = collect(cfg)
    return json.dumps(status, indent=2) if as_json else render(status)
