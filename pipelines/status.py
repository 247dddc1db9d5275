"""`recsys status`: where a work directory stands, read from the files the jobs write; changes nothing.

For the person on call at 7 a.m.: which night and config last succeeded, what the features, model and
evaluation say, which candidate nights are published or rejected, and which jobs are running now (their
locks). Reads no events and no MLflow server.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.schedule import lock_holders
from pipelines.workdir import WorkDir, dated_partitions
from recsys.config import Config, ConfigError
from recsys.model import WEIGHTS_FILE
from recsys.storage import DamagedFileError, fingerprint, read_json


def collect(cfg: Config) -> dict[str, Any]:
    """The status of ``cfg.work_dir`` as a JSON-ready dict (None where a job has not written yet)."""
    wd = WorkDir.of(cfg)
    unreadable: list[str] = []

    def read(section: Callable[[], Any], empty: Any) -> Any:
        """A section, or ``empty`` with the damaged file named under ``unreadable``: the on-call's diagnostic
        tool must show the rest, not a traceback."""
        try:
            return section()
        except (DamagedFileError, KeyError, TypeError) as exc:
            unreadable.append(str(exc) if isinstance(exc, DamagedFileError) else
                              f"a file of this section lacks {exc} ({type(exc).__name__}): written by another version?")
            return empty

    return {
        "work_dir": str(wd.root.resolve()),
        "runs": read(lambda: _markers(wd.root / "runs", unreadable), {}),
        "features": read(lambda: _features(wd.features / "manifest.json"), None),
        "model": read(lambda: _model(wd.model / "train_report.json"), None),
        "evaluation": read(lambda: evaluation_of(wd), None),
        "candidates": read(lambda: _candidates(wd.candidates),
                           {"nights": [], "rejected": [], "rejected_then_published": [], "latest": None}),
        "running": lock_holders(wd.root),
        "unreadable": unreadable,
    }


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _markers(runs: Path, unreadable: list[str]) -> dict[str, dict[str, Any]]:
    """Per scheduled job, its latest readable success marker (by run date); a damaged one is named in
    ``unreadable`` and the job's previous date shown instead."""
    out = {}
    for job in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        for path in sorted(job.glob("*.json"), reverse=True):
            try:
                marker = read_json(path)
            except DamagedFileError as exc:
                unreadable.append(str(exc))
                continue
            out[job.name] = {"run_date": path.stem, "finished_at": marker.get("finished_at"),
                             "model_version": marker.get("model_version"), "config_hash": marker.get("config_hash")}
            break
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


def _evaluation(directory: Path, weights: Path) -> dict[str, Any] | None:
    """The latest evaluation, with ``of_current_model``: whether it evaluated the weights in ``model/`` now
    (False after a night whose training succeeded and whose evaluation failed: its scores and promotion are
    the previous model's; for a report written before reports recorded the weights' SHA-256, by registered
    version; None when neither tells)."""
    report = _read(directory / "report.json")
    if report is None:
        return None
    key = f"ndcg_at_{report['ks'][0]}"
    scorers = {name: metrics[key] for name, metrics in report.items() if isinstance(metrics, dict)}
    promotion = _read(directory / "promotion.json")
    evaluated = report.get("model_weights_sha256")
    current = None if evaluated is None or not weights.is_file() else evaluated == fingerprint(weights)["sha256"]
    trained = _read(weights.parent / "train_report.json") if evaluated is None else None
    if trained is not None and None not in (report.get("model_version"), trained.get("registered_version")):
        # a report of an older release, which named its model by registered version only
        current = str(report["model_version"]) == str(trained["registered_version"])
    return {"split": report["split"], "metric": key, "scores": scorers, "model_version": report.get("model_version"),
            "of_current_model": current,
            "promotion": None if promotion is None else promotion.get("summary"),
            "promoted": None if promotion is None else promotion.get("promoted"),
            "kept_out_in_a_row": None if promotion is None else promotion.get("kept_out_in_a_row")}


def evaluation_of(wd: WorkDir) -> dict[str, Any] | None:
    """:func:`_evaluation` of the work directory's evaluation and model."""
    return _evaluation(wd.evaluation, wd.model / WEIGHTS_FILE)


def stale_warning(evaluation: dict[str, Any]) -> str:
    """What to say about an evaluation (:func:`_evaluation`) that is not of the model in model/ now."""
    version = evaluation["model_version"]
    earlier = "an earlier model (not registered)" if version is None else f"model version {version}"
    return (f"the evaluation and promotion above are of {earlier}, not of the model in model/ now (its evaluation "
            "failed or has not run): rerun recsys evaluate")


def _rejections(root: Path) -> tuple[list[str], list[str]]:
    """(rejected, rejected then published) nights. A rejected partition (``rejected/[shard=…/]date=D``) counts as
    published since when the same partition (``[shard=…/]date=D``) was written after it: a rerun that passed
    (a looser threshold, after a look). A night with any rejected partition not so republished (another shard,
    or a rerun of a published night that failed, leaving the earlier lists) is rejected."""
    still, since = set(), set()
    for day, part in dated_partitions(root.glob("rejected/**/date=*")):
        published = root / part.relative_to(root / "rejected") / "manifest.json"
        refused = part / "drift.json" if (part / "drift.json").is_file() else part
        later = published.is_file() and published.stat().st_mtime_ns > refused.stat().st_mtime_ns
        (since if later else still).add(day.isoformat())
    return sorted(still), sorted(since - still)


def _candidates(root: Path) -> dict[str, Any]:
    """Published and rejected nights (whole or by shard) and the latest published night's manifest counts
    (summed over its shards)."""
    published = [*root.glob("date=*"), *root.glob("shard=*/date=*")]
    nights = sorted({when.isoformat() for when, _ in dated_partitions(published)})
    rejected, republished = _rejections(root)
    latest = None
    if nights:
        day = nights[-1]
        manifests = [m for m in (root / f"date={day}" / "manifest.json", *root.glob(f"shard=*/date={day}/manifest.json"))
                     if m.is_file()]
        counts = [read_json(m) for m in manifests]
        marked = (root / "complete" / f"date={day}.json").is_file()
        # written by a release before completion markers (its manifests record no weights' SHA-256, which came
        # just before the markers): complete when every part is published, as those releases published a whole
        # night at once and each shard whole
        missing = _missing(root, day, manifests)
        older = not marked and bool(counts) and all(c["model"].get("weights_sha256") is None for c in counts) \
            and not missing.endswith("published")
        latest = {"date": day, "parts": len(manifests), "rows": sum(c["rows"] for c in counts),
                  "users": sum(c["users"] for c in counts), "fallback_users": sum(c["fallback_users"] for c in counts),
                  "model_version": counts[0]["model"].get("version") if counts else None,
                  "complete": marked or older, "unmarked_older_release": older,
                  "missing": missing}
    return {"nights": nights, "rejected": rejected, "rejected_then_published": republished, "latest": latest}


def _missing(root: Path, day: str, manifests: list[Path]) -> str:
    """Why a night may lack its completion marker: the shards not published, or for a whole night (or all
    shards there) the marker itself, which the candidates job writes after publishing (rerun that night)."""
    counts = {int(m.parent.parent.name.rsplit("-of-", 1)[1]) for m in manifests if m.parent.parent != root}
    total = max(counts, default=0)
    if total and len(manifests) < total:
        return f"{len(manifests)} of {total} shards published"
    return "completion marker missing: rerun recsys candidates for that night"


def _completeness(latest: dict[str, Any]) -> str:
    if latest["unmarked_older_release"]:
        return "complete (every part published; written before completion markers, by an older release)"
    return "complete" if latest["complete"] else f"NOT complete ({latest['missing']})"


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
                 f"  model:       best val NDCG@10 {m['best_val_ndcg_at_10']:.4f} at epoch {m['best_epoch'] + 1} of "
                 f"{m['epochs_run']} ({m['wall_time_s']:.0f} s), registered version {m['registered_version']}"
                 + (f", warm started from {m['warm_start']}" if m["warm_start"] else ""))
    e = status["evaluation"]
    if e is None:
        lines.append("  evaluation:  none yet")
    else:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in e["scores"].items())
        lines.append(f"  evaluation:  {e['split']} {e['metric']}: {scores}")
        if e["of_current_model"] is False:
            lines.append(f"  STALE:       {stale_warning(e)}")
        if e["promotion"]:
            lines.append(f"  promotion:   {e['promotion']}")
    c = status["candidates"]
    latest = c["latest"]
    if latest is None:
        lines.append("  candidates:  no night published yet")
    else:
        lines.append(f"  candidates:  latest night {latest['date']} ({latest['parts']} part(s)): {latest['rows']} rows "
                     f"for {latest['users']} users, {latest['fallback_users']} fallbacks, model version "
                     f"{latest['model_version']}, {_completeness(latest)}"
                     f"; {len(c['nights'])} nights published")
    if c["rejected"]:
        lines.append(f"  rejected:    nights {', '.join(c['rejected'])} (drift gate; under candidates/rejected/)")
    if c["rejected_then_published"]:
        lines.append(f"  republished: nights {', '.join(c['rejected_then_published'])} (rejected by the drift gate, "
                     "then published by a rerun)")
    for problem in status.get("unreadable", []):
        lines.append(f"  UNREADABLE:  {problem}")
    running = status["running"]
    lines.append("  running now: " + (", ".join(f"{job} ({holder})" for job, holder in running.items())
                                      if running else "nothing"))
    return "\n".join(lines)


def write_prometheus(status: dict[str, Any], path: Path) -> int:
    """Write ``status`` as Prometheus gauges to ``path`` (the node_exporter textfile collector's format, written
    to a temporary file and renamed by ``prometheus_client.write_to_textfile``); returns how many samples.

    Every gauge carries the label ``work_dir``; a part of the pipeline that has not written yet has no sample
    (an alert on ``absent(...)`` sees it). Raises ConfigError if prometheus_client is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
    except ImportError as exc:
        raise ConfigError("recsys status --prometheus needs prometheus_client: pip install "
                          "'recsys-pipeline[monitoring]' (or prometheus-client)") from exc
    registry = CollectorRegistry()
    where = {"work_dir": status["work_dir"]}
    gauges: dict[str, Gauge] = {}  # one Gauge per name, a sample per label set

    def gauge(name: str, doc: str, value: float | None, **labels: str) -> None:
        if value is None:
            return
        if name not in gauges:
            gauges[name] = Gauge(f"recsys_{name}", doc, [*where, *labels], registry=registry)
        gauges[name].labels(**where, **labels).set(float(value))

    for job, marker in status["runs"].items():
        gauge("last_success_timestamp_seconds", "When the job's latest success marker was written (epoch s).",
              _epoch(marker["finished_at"]), job=job)
        gauge("last_success_run_date_timestamp_seconds", "The run date of the job's latest success (epoch s).",
              _epoch(marker["run_date"]), job=job)
    f = status["features"]
    if f is not None:
        gauge("features_built_timestamp_seconds", "When the features were built (epoch s).", _epoch(f["created_at"]))
        for key in ("rows_in", "rows_kept", "n_users", "n_items"):
            gauge(f"features_{key}", f"Features manifest: {key}.", f[key])
        gauge("features_newest_event_timestamp", "Newest kept event, in the input's timestamp unit.",
              f["newest_timestamp"])
        for reason, rows in (f["dropped"] or {}).items():
            gauge("features_rows_dropped", "Rows dropped by the feature job, per reason.", rows, reason=reason)
    m = status["model"]
    if m is not None:
        gauge("model_best_val_ndcg_at_10", "Best validation NDCG@10 of the latest model.", m["best_val_ndcg_at_10"])
        gauge("model_train_seconds", "Training wall time of the latest model.", m["wall_time_s"])
        gauge("model_epochs_run", "Epochs run by the latest training.", m["epochs_run"])
        version = m["registered_version"]
        gauge("model_registered_version", "Registered version of the latest model.",
              None if version is None else int(version))
    e = status["evaluation"]
    if e is not None:
        for scorer, value in e["scores"].items():
            gauge("evaluation_score", "Offline metric of the latest evaluation.", value, scorer=scorer,
                  metric=e["metric"], split=e["split"])
        gauge("promotion_promoted", "1 if the latest evaluation promoted its model, 0 if it kept the champion.",
              None if e["promoted"] is None else int(bool(e["promoted"])))
        gauge("promotion_kept_out_in_a_row", "Versions registered after the champion that the gate kept out, the "
              "latest included (0 when it promoted).", e["kept_out_in_a_row"])
        gauge("evaluation_of_current_model", "1 if the latest evaluation is of the model in model/ now, 0 if of an "
              "earlier one (the latest evaluation failed).",
              None if e["of_current_model"] is None else int(e["of_current_model"]))
    c = status["candidates"]
    gauge("candidates_nights_published", "Candidate nights published in the work directory.", len(c["nights"]))
    gauge("candidates_nights_rejected", "Candidate nights rejected by the drift gate and not published since.",
          len(c["rejected"]))
    latest = c["latest"]
    if latest is not None:
        gauge("candidates_latest_night_timestamp_seconds", "Date of the latest published night (epoch s).",
              _epoch(latest["date"]))
        for key in ("rows", "users", "fallback_users", "parts"):
            gauge(f"candidates_latest_{key}", f"Latest published night: {key}.", latest[key])
        gauge("candidates_latest_complete", "1 if the latest night has its completion marker (all its parts "
              "published), else 0.", int(latest["complete"]))
    for job in ("features", "train", "evaluate", "candidates", "run"):
        gauge("job_running", "1 while the job holds its lock on the work directory.",
              int(any(name == job or name.startswith(f"{job}.") for name in status["running"])), job=job)
    write_to_textfile(str(path), registry)
    return sum(len(family.samples) for family in registry.collect())


def _epoch(text: str | None) -> float | None:
    """Seconds since the epoch of an ISO date or date-time (UTC when it has no zone); None stays None."""
    if text is None:
        return None
    when = dt.datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def run(cfg: Config, as_json: bool = False, prometheus: Path | None = None) -> str:
    status = collect(cfg)
    if prometheus is not None:
        write_prometheus(status, prometheus)
    return json.dumps(status, indent=2) if as_json else render(status)
