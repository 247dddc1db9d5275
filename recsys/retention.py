"""MLflow retention: delete old registered model versions and old runs (``tracking.keep_days``).

Beside :mod:`recsys.tracking` and :mod:`recsys.registry`, the only module of ours that imports mlflow. Every
night adds a version of ``tracking.registered_model`` (a copy of the model's files in its run's artifacts) and
four runs (params, per-epoch metrics, artifacts); without retention the store grows for ever.

What goes, relative to a run date D and ``keep_days`` N (cut-off: 00:00 UTC of D - (N - 1) days, so N = 7 keeps
D and the 6 days before, as ``candidates.keep_days`` keeps nights):

- versions of the registered model created before the cut-off, unless they hold an alias (``champion``,
  ``challenger``, any other), are the version the champion replaced (tag ``promotion.champion_version``: the
  rollback target) or are named in ``protected`` by the caller (the latest candidates' versions, the work
  directory's model);
- runs of ``tracking.experiment`` that ended (FINISHED, FAILED, KILLED; never a RUNNING one) before the cut-off,
  unless a version still in the registry (of any registered model) was registered from them. They are deleted
  (MLflow's soft delete), then, in a store this process reaches directly (the embedded SQLite store, or a
  ``sqlite://`` / ``postgresql://`` … URI), purged with their artifacts as ``mlflow gc`` purges a run. A tracking
  SERVER owns its store: there the runs are only marked deleted and the server's operator runs ``mlflow gc``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.config import Config
from recsys.faults import fault_point
from recsys.tracking import (
    TrackingUnavailableError,
    _server_failure,
    all_pages,
    check_sqlite_store,
    configure_http,
    tracking_uri,
)

log = logging.getLogger(__name__)

ENDED = ("FINISHED", "FAILED", "KILLED")  # run statuses that retention may delete; RUNNING and SCHEDULED never
REPLACED_TAG = "promotion.champion_version"  # set by the promotion gate on the version it promoted
_SERVERS = ("http://", "https://", "databricks")  # stores behind a server: its operator purges (mlflow gc)


def cutoff(run_date: dt.date, keep_days: int) -> dt.datetime:
    """00:00 UTC of ``run_date - (keep_days - 1)`` days: what was created (or ended) before it goes."""
    day = run_date - dt.timedelta(days=keep_days - 1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


@dataclass
class Pruned:
    """What one retention pass deleted (or, with ``dry_run``, would delete), and which old versions it kept."""

    keep_days: int
    cutoff: str  # ISO time, UTC
    dry_run: bool
    versions_deleted: list[str] = field(default_factory=list)
    versions_kept: dict[str, str] = field(default_factory=dict)  # old versions kept: version -> why
    runs_deleted: list[str] = field(default_factory=list)  # soft-deleted (and purged, see purge)
    runs_purged: list[str] = field(default_factory=list)  # removed for good with their artifacts
    purge: str = "none"  # "done", "started" (stopped midway), "left to the tracking server's operator (mlflow gc)",
    # "dry run", "none"
    stopped: str | None = None  # why the pass stopped before its end (what it did is the above), None = it ended

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        versions = ", ".join(f"v{v}" for v in self.versions_deleted) or "none"
        kept = ", ".join(f"v{v} ({why})" for v, why in self.versions_kept.items()) or "none"
        verb = "would delete" if self.dry_run else "deleted"
        return (f"tracking retention (keep_days={self.keep_days}, before {self.cutoff}): {verb} "
                f"{len(self.versions_deleted)} model versions ({versions}), {len(self.runs_deleted)} runs; "
                f"purged {len(self.runs_purged)} runs with their artifacts (purge: {self.purge}); older versions "
                f"kept: {kept}")


def prune_tracking(cfg: Config, run_date: dt.date, protected: dict[str, str], dry_run: bool = False) -> Pruned:
    """Delete what ``cfg.tracking.keep_days`` lets go (module docstring); ``protected`` maps versions of
    ``tracking.registered_model`` that must stay to the reason. Returns what was deleted.

    Raises ValueError when ``keep_days`` is None, :class:`TrackingUnavailableError` when a tracking server does
    not answer (what was deleted before stays deleted; a later pass goes on), MLflow's errors otherwise.
    """
    keep = cfg.tracking.keep_days
    if keep is None:
        raise ValueError("tracking.keep_days is None: retention keeps everything")
    from mlflow import MlflowClient

    configure_http(cfg)
    uri = tracking_uri(cfg)
    check_sqlite_store(uri)
    limit = cutoff(run_date, keep)
    pruned = Pruned(keep, limit.isoformat(), dry_run)
    try:
        _prune(cfg, MlflowClient(tracking_uri=uri), uri, limit, protected, pruned)
    except BaseException as exc:  # SIGTERM (pipelines.prune) too: what was deleted before it goes to the record
        exc.retention_pass = pruned  # type: ignore[attr-defined]
        raise
    return pruned


def _prune(cfg: Config, client: Any, uri: str, limit: dt.datetime, protected: dict[str, str], pruned: Pruned) -> None:
    """The pass of :func:`prune_tracking`, filling ``pruned`` as it goes."""
    limit_ms, dry_run = int(limit.timestamp() * 1000), pruned.dry_run
    with _answering(cfg, uri):
        doomed = _old_versions(client, cfg.tracking.registered_model, limit_ms, protected, pruned.versions_kept)
        for version in doomed:
            if dry_run or _delete_version(client, cfg.tracking.registered_model, version):
                pruned.versions_deleted.append(version)
                fault_point("retention-version-deleted")
        if pruned.versions_deleted:
            log.info("tracking retention: %s model versions of %s: %s", "would delete" if dry_run else "deleted",
                     cfg.tracking.registered_model, ", ".join(f"v{v}" for v in pruned.versions_deleted))
        # runs behind every version still registered, of any model (read after the deletions: not those)
        gone = set(pruned.versions_deleted) if dry_run else set()
        kept_runs = {mv.run_id for mv in all_pages(client.search_model_versions)
                     if not (mv.name == cfg.tracking.registered_model and str(mv.version) in gone)}
        kept_runs |= pinned_runs(cfg)
        old = _old_runs(client, cfg.tracking.experiment, limit_ms, kept_runs)
        if dry_run:
            pruned.runs_deleted = [run.info.run_id for run in old]
            pruned.purge = "dry run"
            return
        for run in old:
            if run.info.lifecycle_stage != "deleted":
                client.delete_run(run.info.run_id)
            pruned.runs_deleted.append(run.info.run_id)
        if old:
            log.info("tracking retention: deleted %d runs of experiment %s that ended before %s", len(old),
                     cfg.tracking.experiment, limit.isoformat())
        if uri.startswith(_SERVERS):
            pruned.purge = "left to the tracking server's operator (mlflow gc)" if old else "none"
            if old:
                log.info("tracking retention: %s is a tracking server, which owns its store: the %d runs are marked "
                         "deleted; their rows and artifacts go when the server's operator runs `mlflow gc`", uri,
                         len(old))
        else:
            own = Path(cfg.work_dir) / "mlartifacts" if cfg.tracking.uri is None else None
            pruned.purge = "started" if old else "none"
            _purge(uri, [run.info.run_id for run in old], own, purged=pruned.runs_purged)
            pruned.purge = "done" if old else "none"


def pinned_runs(cfg: Config) -> set[str]:
    """Runs the config reads a model from (``train.init_from`` / ``candidates.model`` = ``runs:/ID/…``)."""
    specs = (cfg.train.init_from, cfg.candidates.model)
    return {match[1] for spec in specs if (match := re.match(r"runs:/([^/]+)/", spec or ""))}


def _old_versions(client: Any, name: str, limit_ms: int, protected: dict[str, str],
                  kept: dict[str, str]) -> list[str]:
    """Versions of ``name`` created before ``limit_ms`` that may go, oldest first; the old ones that stay are
    added to ``kept`` with the reason."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        return []
    by_alias = client.get_registered_model(name).aliases  # alias -> version; a version may hold several
    held: dict[str, list[str]] = {}
    for alias, held_by in sorted(by_alias.items()):
        held.setdefault(str(held_by), []).append(alias)
    keep = {**protected, **{v: f"alias {', '.join(names)}" for v, names in held.items()}}
    champion = None if by_alias.get("champion") is None else str(by_alias["champion"])
    if champion is not None:
        replaced = client.get_model_version(name, champion).tags.get(REPLACED_TAG, "None")
        if replaced != "None":
            keep.setdefault(replaced, f"the version champion v{champion} replaced (the rollback target)")
    doomed = []
    for mv in sorted(all_pages(client.search_model_versions, filter_string=f"name = '{name}'"),
                     key=lambda mv: int(mv.version)):
        if mv.creation_timestamp >= limit_ms:
            continue
        if str(mv.version) in keep:
            kept[str(mv.version)] = keep[str(mv.version)]
        else:
            doomed.append(str(mv.version))
    return doomed


def _delete_version(client: Any, name: str, version: str) -> bool:
    """Delete ``version`` of ``name`` unless an alias was set on it since it was listed (an operator's rollback
    at this moment); returns whether it was deleted."""
    aliases = client.get_model_version(name, version).aliases
    if aliases:
        log.info("tracking retention: v%s of %s holds alias %s now: kept", version, name, ", ".join(aliases))
        return False
    client.delete_model_version(name, version)
    return True


def _old_runs(client: Any, experiment: str, limit_ms: int, kept_runs: set[str]) -> list[Any]:
    """Runs of ``experiment`` (active or already soft-deleted) that ended before ``limit_ms`` with an ENDED
    status, less ``kept_runs``."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = all_pages(client.search_runs, experiment_ids=[exp.experiment_id], run_view_type=ViewType.ALL,
                  filter_string=f"attributes.end_time < {limit_ms}", max_results=1000)
    return [run for run in runs if run.info.status in ENDED and run.info.end_time is not None
            and run.info.end_time < limit_ms and run.info.run_id not in kept_runs]


def _purge(uri: str, run_ids: list[str], artifact_root: Path | None = None, purged: list[str] | None = None
           ) -> list[str]:
    """Remove the soft-deleted ``run_ids`` for good: their artifacts, then their rows, the two steps ``mlflow gc
    --run-ids`` takes per run (not ``mlflow gc`` itself: with no experiment named it also purges every other
    deleted experiment and logged model of the store). Returns the runs purged. ``artifact_root``: the embedded
    store's own artifact directory; a run whose artifacts lie elsewhere (a work directory copied from another,
    whose store still names the other's absolute paths) loses its rows only, never the other's files. ``purged``:
    the list to append each purged run to as it goes (a pass stopped midway records those)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import _get_store

    store = _get_store(uri)
    if not hasattr(store, "_hard_delete_run"):
        log.warning("tracking retention: the store %s cannot purge runs; %d runs stay marked deleted", uri,
                    len(run_ids))
        return [] if purged is None else purged
    purged = [] if purged is None else purged
    for run_id in run_ids:
        run = store.get_run(run_id)
        if run.info.lifecycle_stage != "deleted":  # restored meanwhile
            continue
        where = run.info.artifact_uri
        local = _local_path(where)
        if artifact_root is not None and (local is None or not local.is_relative_to(artifact_root.resolve())):
            log.warning("tracking retention: run %s's artifacts are at %s, outside this store's %s (a work "
                        "directory copied from another?): its rows are purged, its files left", run_id, where,
                        artifact_root)
        else:
            get_artifact_repository(where).delete_artifacts()
        store._hard_delete_run(run_id)
        if local is not None:
            _remove_empty_run_dir(local.parent, run_id)
        purged.append(run_id)
    return purged


def _local_path(artifact_uri: str) -> Path | None:
    """The directory of a local (``file:`` or absolute) artifact URI, resolved; None for a remote one."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    if not artifact_uri.startswith(("file:", "/")):
        return None
    return Path(local_file_uri_to_path(artifact_uri)).resolve()


def _remove_empty_run_dir(parent: Path, run_id: str) -> None:
    """``<artifact root>/<experiment>/<run id>/`` of a local store, once its ``artifacts/`` is gone and it is empty
    (MLflow removes ``artifacts/`` only; an empty directory per purged run would stay)."""
    if parent.name == run_id and parent.is_dir() and not any(parent.iterdir()):
        os.rmdir(parent)


@contextmanager
def _answering(cfg: Config, uri: str) -> Iterator[None]:
    """Turn a tracking server's failure to answer into :class:`TrackingUnavailableError` naming the URI."""
    try:
        yield
    except Exception as exc:
        if not _server_failure(uri, exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unavailable: {first}. Tracking retention stopped there (what it "
            "deleted before is logged above); the next pass goes on. Check tracking.uri and the server (gave up "
            f"after {cfg.tracking.http_max_retries} retries, {cfg.tracking.http_timeout_s} s per request)") from exc
