"""Tracking retention job: ``recsys prune``, and the end of every successful ``recsys run``.

Deletes the MLflow model versions and runs that ``tracking.keep_days`` lets go (:mod:`recsys.retention`), never
the versions this work directory still serves: the ones the latest published candidates (and the latest complete
night) were scored with, and the one in ``model/``. Each pass is recorded in
``<work_dir>/retention/date=YYYY-MM-DD.json`` {``run_date``, ``passes``: [{``finished_at``,
``registered_model``, ``experiment``, ``keep_days``, ``cutoff``, ``versions_deleted``, ``versions_kept``,
``runs_deleted``, ``runs_purged``, ``purge``, ``stopped``}]}; a pass stopped early (a server gone, SIGTERM) is recorded with what it did.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.schedule import today_utc
from pipelines.workdir import WorkDir, dated_partitions
from recsys.config import Config, ConfigError
from recsys.registry import pinned_version
from recsys.retention import Pruned, cutoff, prune_tracking
from recsys.storage import read_json, write_json
from recsys.tracking import TrackingUnavailableError

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None, dry_run: bool = False) -> Pruned:
    """Prune the tracking store for ``run_date`` (default today, UTC) and record the pass (not a dry run).

    Raises ConfigError when ``tracking.keep_days`` is unset or tracking is off, DamagedFileError when a manifest
    that says which versions are served cannot be read (nothing is deleted then), and what
    :func:`recsys.retention.prune_tracking` raises.
    """
    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled is false: there is no MLflow store to prune")
    if cfg.tracking.keep_days is None:
        raise ConfigError("tracking.keep_days is null (keep everything): set tracking.keep_days=N to delete the "
                          "model versions and runs of N days or more before the run date")
    day = run_date or today_utc()
    if day > today_utc() + dt.timedelta(days=1):  # a typo'd year would delete every unprotected version and run
        raise ConfigError(f"--run-date {day} is in the future (today is {today_utc()}, UTC): retention deletes what "
                          "is tracking.keep_days older than the run date; pass today's date or leave it out")
    with _stop_on_sigterm():  # the record too: a SIGTERM while it is written stops the pass, not the process
        try:
            pruned = prune_tracking(cfg, day, served_versions(cfg), dry_run=dry_run)
        except BaseException as exc:  # a server gone, SIGTERM: what the pass deleted before is recorded all the same
            _record_stopped(cfg, day, exc, dry_run)
            raise
        log.info("%s", pruned.summary())
        if not dry_run:
            record(cfg, day, pruned)
    return pruned


def _record_stopped(cfg: Config, day: dt.date, exc: BaseException, dry_run: bool) -> None:
    """Record what a pass stopped by ``exc`` deleted before (nothing to record: a warning for a SIGTERM only)."""
    partial = getattr(exc, "retention_pass", None)
    stopped = "SIGTERM" if isinstance(exc, _Stopped) else f"{type(exc).__name__}: {exc}"[:300]
    if partial is None or dry_run or not (partial.versions_deleted or partial.runs_deleted):
        if isinstance(exc, _Stopped):
            log.warning("tracking retention stopped by SIGTERM before deleting anything")
        return
    partial.stopped = stopped
    try:
        where = record(cfg, day, partial)
        log.warning("tracking retention stopped early (%s) after deleting %d model versions and %d runs: recorded in "
                    "%s; the next pass goes on", stopped, len(partial.versions_deleted), len(partial.runs_deleted),
                    where)
    except Exception as failed:  # noqa: BLE001 - the pass's own failure is the one to report
        log.warning("tracking retention: recording the stopped pass failed (%s)", failed)


class _Stopped(SystemExit):  # not an Exception: nothing on the way catches it as a failure to log
    """SIGTERM during a retention pass: what it deleted is recorded, then ``recsys prune`` exits 143, and the
    ``recsys run`` whose night it ends goes on as done (:func:`after_night`)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`_Stopped` in the block (main thread only; elsewhere the process's own handling)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def after_night(cfg: Config, run_date: dt.date) -> None:
    """Retention at the end of a successful ``recsys run``, once its candidates are published: a failure is a
    warning, never the night's failure (its outputs are already published); the next night retries. SIGTERM
    (a scheduler's timeout during a long first pass over a big store) stops the pass there and the night ends
    as done: killed, it would have been run again from its features the next time."""
    if cfg.tracking.keep_days is None or not cfg.tracking.enabled:
        return
    try:
        run(cfg, run_date)
    except _Stopped:
        log.warning("tracking retention stopped by SIGTERM after the night %s was published: the night stands "
                    "(marked done); what was deleted stays deleted, and the next night's pass or `recsys prune` "
                    "goes on from there", run_date)
    except TrackingUnavailableError as exc:
        log.warning("%s; the night %s is published all the same", exc, run_date)
    except Exception as exc:
        log.warning("tracking retention (tracking.keep_days=%d) failed after the night %s was published (%s: %s); "
                    "the night stands, the next night retries, or run `recsys prune`", cfg.tracking.keep_days,
                    run_date, type(exc).__name__, exc, exc_info=True)


def served_versions(cfg: Config) -> dict[str, str]:
    """Versions of ``tracking.registered_model`` this work directory serves, with why: the model in ``model/``
    (``train_report.json``) and the one it was warm-started from, versions the config names
    (``train.init_from`` / ``candidates.model`` = ``models:/NAME/VERSION``), and those that scored the latest
    published night (each of its parts) and the latest complete night (its completion marker)."""
    wd = WorkDir.of(cfg)
    name = cfg.tracking.registered_model
    out: dict[str, str] = {}
    report = wd.model / "train_report.json"
    if report.is_file():
        trained = read_json(report)
        if trained.get("registered_model", name) == name and trained.get("registered_version") is not None:
            out[str(trained["registered_version"])] = "the work directory's model (model/train_report.json)"
    for key, spec in (("train.init_from", cfg.train.init_from), ("candidates.model", cfg.candidates.model)):
        pinned = pinned_version(spec)
        if pinned is not None and pinned[0] == name:  # an alias's version: kept anyway
            out.setdefault(pinned[1], f"named by {key} ({spec})")
    if report.is_file():
        warm = (read_json(report).get("warm_start") or {})
        if warm.get("name") == name and warm.get("version") is not None:
            out.setdefault(str(warm["version"]), "the work directory's model was warm-started from it")
    sources = [(path, "model") for path in _latest_night(wd)]
    markers = dated_partitions((wd.candidates / "complete").glob("date=*.json"))
    if markers:
        sources.append((max(markers)[1], "model"))
    for path, key in sources:
        model = read_json(path).get(key) or {}
        if model.get("name", name) == name and model.get("version") is not None:
            out.setdefault(str(model["version"]), f"scored the candidates of {path.relative_to(wd.root)}")
    return out


def _latest_night(wd: WorkDir) -> list[Path]:
    """The manifests of the latest published night's parts (whole, or shards), empty before any."""
    nights = dated_partitions([*wd.candidates.glob("date=*"), *wd.candidates.glob("shard=*/date=*")])
    nights = [(day, path) for day, path in nights if (path / "manifest.json").is_file()]
    if not nights:
        return []
    latest = max(day for day, _ in nights)
    return sorted(path / "manifest.json" for day, path in nights if day == latest)


def record(cfg: Config, day: dt.date, pruned: Pruned) -> Path:
    """Add this pass to ``<work_dir>/retention/date=YYYY-MM-DD.json`` (atomically; earlier passes of the date
    stay listed)."""
    path = Path(cfg.work_dir) / "retention" / f"date={day.isoformat()}.json"
    passes = read_json(path).get("passes", []) if path.is_file() else []
    # not the tracking URI: a database URI may carry a password
    entry = {"finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
             "registered_model": cfg.tracking.registered_model, "experiment": cfg.tracking.experiment,
             **{k: v for k, v in pruned.to_dict().items() if k != "dry_run"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"run_date": day.isoformat(), "passes": [*passes, entry]}, atomic=True)
    # the records themselves are kept as long as what they describe: those of dates before the cut-off go
    first_kept = cutoff(day, cfg.tracking.keep_days or 1).date()
    for old_day, old in dated_partitions(path.parent.glob("date=*.json")):
        if old_day < first_kept:
            old.unlink(missing_ok=True)
    return path
