"""Candidate job: a model (local or from the MLflow registry) scores the users of the current features;
top-K per user goes to the date partition ``<work_dir>/candidates/date=YYYY-MM-DD/``, with a manifest and
a drift report against the previous night. With a shard (``--shard i/N``) only that shard's users are scored,
into ``candidates/shard=i-of-N/date=YYYY-MM-DD/``, and drift is measured on those users only. With
``candidates.active_window`` only the users with a recent event (in data time) are scored; with
``candidates.allowed_items`` only the items of that list are candidates."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from features import schema
from features.artifacts import FeatureSet, last_event_times, load_features
from features.readers import read_item_ids
from pipelines.workdir import WorkDir, dated_partitions, log_features_input
from recsys.candidates import (
    TrainedModel,
    generate_candidates,
    load_trained_model,
    read_candidates,
    recall_violations,
    select_active,
)
from recsys.config import Config, save_config
from recsys.device import resolve_device
from recsys.drift import DriftError, drift_gate, drift_report, drift_violations
from recsys.faults import fault_point
from recsys.model import WEIGHTS_FILE
from recsys.registry import ModelRef, describe_version, fetch_model, is_mlflow_uri
from recsys.sharding import Shard, ShardLayoutError, in_shard, select_shard
from recsys.storage import atomic_dir, fingerprint, fsync_dir, read_json, remove_dir, scratch_dir, write_json
from recsys.tracking import JobRun, job_run

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None, shard: Shard | None = None) -> Path:
    """Write the partition of ``candidates.date`` (else ``run_date``, else today UTC) atomically (a rerun
    replaces it) and return it; with ``shard``, that shard's partition inside it, for its users only.

    Raises DriftError when the drift gate fails: the lists then go to ``candidates/rejected/date=…`` for
    inspection and the published partition of that date, if any, is left as it was. Raises ShardLayoutError
    if the night already holds the other layout (whole vs sharded, or shards of another N), and ConfigError
    before reading anything if ``candidates.device`` names a GPU this machine lacks.
    """
    device = resolve_device(cfg.candidates.device, "candidates.device")
    wd = WorkDir.of(cfg)
    day = cfg.candidates.date or run_date or dt.datetime.now(dt.UTC).date()
    part = None if shard is None else shard.name
    _check_layout(wd, day, shard)
    feats = load_features(wd.features)
    # the whole night's users, for a shard that tunes its index on them (candidates.target_recall)
    night = feats if shard is not None and cfg.candidates.target_recall is not None else None
    if shard is not None:
        feats = select_shard(feats, shard)
    activity: dict[str, Any] = {"active_window": None, "active_since": None, "users_inactive": 0}
    if cfg.candidates.active_window is not None:  # the newest event of ALL users: every shard the same
        last_times = last_event_times(wd.features)
        feats, activity = select_active(feats, last_times, cfg.candidates.active_window)
        night = None if night is None else select_active(night, last_times, cfg.candidates.active_window)[0]
    allowed, allow_file = None, None
    if cfg.candidates.allowed_items is not None:  # read (and checked) before any model or MLflow run
        allowed = read_item_ids(cfg.candidates.allowed_items, "candidates.allowed_items", cfg.data.item_id_type)
        allow_file = fingerprint(cfg.candidates.allowed_items)
    spec = cfg.candidates.model or str(wd.model)
    # A local model is read before an MLflow run is opened, so a missing one fails at once.
    local = None if is_mlflow_uri(spec) else load_trained_model(spec, device)
    log.info("candidates: user vectors on %s (candidates.device=%s), FAISS on the CPU", device,
             cfg.candidates.device)
    tags = {"candidates.date": day, "device": str(device),
            **({} if shard is None else {"candidates.shard": str(shard)})}
    with job_run(cfg, "candidates", tags=tags) as tracker, \
            scratch_dir(wd.root, "scored-model") as tmp:
        log_features_input(tracker, wd.features, feats, "scoring")
        trained, ref, weights = _resolve_model(cfg, spec, local, tracker, Path(tmp), device)
        scored_with = {**ref.to_dict(), "weights_sha256": weights}
        features_sha = fingerprint(wd.features / schema.FEATURE_FILES["manifest"])["sha256"]
        settings = night_settings(cfg, allow_file)
        if shard is not None:  # before scoring: fail fast if other shards of the night used another model
            _check_same_night(wd, day, shard, scored_with, features_sha, settings)
        table, stats = generate_candidates(trained, feats, cfg.candidates, allowed, night)
        fault_point("candidates-scored")
        parts = _previous_parts(wd, day, part, table.schema[schema.USER_ID])
        drift = drift_report(table, _previous_lists(parts, shard, table.schema[schema.USER_ID]),
                             stats["k_effective"])
        drifted = drift_violations(drift, cfg.candidates)
        violations = drifted + recall_violations(stats["search"], cfg.candidates, stats["k_effective"])
        gate = drift_gate(cfg.candidates, bool(parts))
        if gate == "no previous night":  # e.g. the first night
            log.warning("candidates: drift gate not applied tonight: no earlier published night (whole, or all "
                        "of its shards) in %s to compare with", wd.candidates)
        # one partition, or every shard of a night split another way: shard=*-of-N/date=…
        previous = (None if not parts else parts[0] if len(parts) == 1
                    else wd.candidates / f"shard=*-of-{len(parts)}" / parts[0].name)
        drift = {"date": day.isoformat(), "previous": str(previous) if previous else None, **drift,
                 "gate": gate, "passed": not violations, "violations": violations}
        keep = cfg.candidates.keep_days
        expired = [] if keep is None or violations else wd.expired_candidates(day, keep, part)
        old_markers = [] if keep is None or violations else _expired_markers(wd, expired, day, keep)
        retention = {"keep_days": keep,
                     "removed": [str(p.relative_to(wd.candidates)) for p in (*expired, *old_markers)]}
        manifest = _manifest(cfg, day, table.height, {**stats, **activity, "allowed_items": allow_file,
                                                      "night_settings": settings},
                             scored_with, feats, wd, shard, device)
        if not violations:  # again: another job may have published this night while this one scored
            _check_layout(wd, day, shard)
            if shard is not None:
                _check_same_night(wd, day, shard, scored_with, manifest["features"]["manifest"]["sha256"], settings)
        target = wd.rejected_candidates(day, part) if violations else wd.candidates_partition(day, part)
        unmarked = False
        try:
            with atomic_dir(target) as out:
                table.write_parquet(out / "candidates.parquet")
                fault_point("candidates-parquet-written")
                write_json(out / "manifest.json", manifest)
                write_json(out / "drift.json", drift)
                # this run's housekeeping, apart from the manifest: a rerun of the night (retention done already)
                # keeps the manifest, and so the completion marker, byte for byte
                write_json(out / "retention.json", retention)
                fault_point("candidates-manifest-written")
                save_config(cfg, out / "config.yaml")
                fault_point("candidates-before-publish")
                if not violations:
                    unmarked = _unmark_night(wd, day)
        except Exception:
            if unmarked:  # the publish failed (flush or swap: an I/O error) and the earlier lists are back in place
                _remark_night(wd, day, shard)
            raise
        fault_point("candidates-published")
        if not violations:  # first: a later failure (retention, MLflow) must not leave a published night unmarked
            _mark_night(wd, day, shard)
        _remove_expired(wd, old_markers, expired)  # only once tonight is published; a rejected night removes nothing
        if expired:
            log.info("candidates: removed %d partitions older than %d days: %s", len(expired), keep,
                     ", ".join(retention["removed"]))
        _track(tracker, manifest, drift, retention, target, shard)
        if violations:
            raise DriftError(f"candidates for {day} not published: " + "; ".join(violations)
                             + (f" (drift against {previous})" if previous and drifted else "")
                             + f"; the lists are in {target} for inspection")
    log.info("candidates: %d rows for %d users (%d fallbacks) → %s",
             table.height, stats["users"], stats["fallback_users"], target)
    return target


def _resolve_model(
    cfg: Config, spec: str, local: TrainedModel | None, tracker: JobRun, tmp: Path, device: torch.device
) -> tuple[TrainedModel, ModelRef, str]:
    """The model of ``spec``: ``local`` (already loaded) or downloaded from MLflow into ``tmp``, on ``device``;
    with what it is (URI, registered version) and the SHA-256 of its weights file."""
    if local is None:
        ref, files = fetch_model(tracker, spec, tmp)
        return load_trained_model(files, device), ref, fingerprint(files / WEIGHTS_FILE)["sha256"]
    report_path = Path(spec) / "train_report.json"
    report = read_json(report_path) if report_path.is_file() else {}
    version = None if report.get("registered_version") is None else str(report["registered_version"])
    # the registered model it was trained as (recorded since; another config may share the work directory)
    name = report.get("registered_model") or cfg.tracking.registered_model
    ref = describe_version(tracker, str(Path(spec).resolve()), name, version)
    return local, ref, fingerprint(Path(spec) / WEIGHTS_FILE)["sha256"]


def night_settings(cfg: Config, allow_file: dict[str, Any] | None) -> dict[str, Any]:
    """What shapes a night's lists besides the model and the features: every shard of one night must share it
    (K, seen items, the index and its search, the active users, the allow list's content)."""
    c = cfg.candidates
    return {"k": c.k, "exclude_seen": c.exclude_seen, "index": c.index, "nprobe": c.nprobe, "ef_search": c.ef_search,
            "target_recall": c.target_recall, "active_window": c.active_window,
            "allowed_items_sha256": None if allow_file is None else allow_file["sha256"]}


def _recorded_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """A shard manifest's :func:`night_settings`; for one written before they were recorded, those its other
    fields hold (K, the index and its search, seen items, the active window, the allow list's sha256)."""
    if "night_settings" in manifest:
        return manifest["night_settings"]
    index, allowed = manifest.get("index") or {}, manifest.get("allowed_items")
    return {"k": manifest.get("k"), "exclude_seen": index.get("exclude_seen"), "index": index.get("factory"),
            "nprobe": index.get("nprobe"), "ef_search": index.get("ef_search"),
            "active_window": manifest.get("active_window"),
            "allowed_items_sha256": None if allowed is None else allowed.get("sha256")}


def _settings_differ(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """``key theirs → ours`` for each night setting both record and that differs."""
    return [f"candidates.{key} {theirs[key]!r} → {ours[key]!r}" for key in sorted(set(theirs) & set(ours))
            if theirs[key] != ours[key]]


def _same_model(theirs: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether a shard manifest's ``model`` record names the model of ``ours``: by the weights' SHA-256; for a
    shard written before that was recorded (an older release), by registered name, version and run."""
    if theirs.get("weights_sha256") is not None and ours.get("weights_sha256") is not None:
        return theirs["weights_sha256"] == ours["weights_sha256"]
    named = [(record.get("name"), record.get("version"), record.get("run_id")) for record in (theirs, ours)]
    return named[0][1] is not None and named[0] == named[1]


def _distinct_models(records: list[dict[str, Any]]) -> int:
    """How many models the shard manifests' ``model`` records name (:func:`_same_model`)."""
    groups: list[dict[str, Any]] = []
    for record in records:
        if not any(_same_model(record, seen) for seen in groups):
            groups.append(record)
    return len(groups)


def _check_same_night(wd: WorkDir, day: dt.date, shard: Shard, model: dict[str, Any], features_sha: str,
                      settings: dict[str, Any]) -> None:
    """Raise ShardLayoutError if a published shard of night ``day`` scored other weights, other features or
    other night settings (:func:`night_settings`) than this one (a promotion, rollback, retraining, features
    rebuild, a changed allow list or config between the shards' starts)."""
    for name in wd.candidate_shards(day):
        if name == shard.name:
            continue  # this shard's own earlier run: replaced by this one
        theirs = read_json(wd.candidates / name / f"date={day.isoformat()}" / "manifest.json")
        differ = _settings_differ(_recorded_settings(theirs), settings)
        if not _same_model(theirs["model"], model):
            older = "" if theirs["model"].get("weights_sha256") is not None else (
                ", recorded without its weights' SHA-256 by an older release, and "
                + ("no registered version tells the two apart (tracking off)" if theirs["model"].get("version") is None
                   else "not the same registered version and run") + ": rerun that shard too")
            what = (f"model {theirs['model'].get('uri')} (version {theirs['model'].get('version')}{older})",
                    f"{model['uri']} (version {model['version']})")
        elif theirs["features"]["manifest"]["sha256"] != features_sha:
            what = (f"features manifest sha256 {theirs['features']['manifest']['sha256'][:12]}…",
                    f"{features_sha[:12]}…")
        elif differ:
            raise ShardLayoutError(
                f"night {day}: {name} was scored with other settings than shard {shard} ({'; '.join(differ)}): "
                "the union of a night's shards is one night's lists only with one K, one index, one allow list "
                "(the same file content) and one active window. Run every shard of the night with the same "
                "config and allow list, or remove the night's shards and rerun them all")
        else:
            continue
        raise ShardLayoutError(
            f"night {day}: {name} was scored with {what[0]}, shard {shard} would use {what[1]}: one night's "
            "shards must come from one model and one feature build. Pin the model for all shards (--model "
            "models:/NAME/VERSION, resolved once by the orchestrator), or remove the night's shards and rerun "
            "them all")


def _existing(wd: WorkDir) -> set[Path]:
    """The night completion markers present (:meth:`WorkDir.night_marker`)."""
    return set((wd.candidates / "complete").glob("date=*.json"))


def _expired_markers(wd: WorkDir, expired: list[Path], day: dt.date, keep_days: int) -> list[Path]:
    """Completion markers that retention removes: of the nights losing a published part tonight (no longer
    complete), and of expired nights whose marker lists a part that is gone already (left by a run killed
    between removing a partition and its marker, or by a partition removed by hand). Sorted."""
    losing = {wd.night_marker(when) for when, _ in dated_partitions(
        p for p in expired if p.relative_to(wd.candidates).parts[0] != "rejected")}
    oldest_kept = day - dt.timedelta(days=keep_days - 1)
    expired_nights = [wd.night_marker(when) for when, _ in dated_partitions(_existing(wd))
                      if when < oldest_kept]
    return sorted((losing & _existing(wd)) | {m for m in expired_nights if _lacks_a_part(wd, m)})


def _lacks_a_part(wd: WorkDir, marker: Path) -> bool:
    """Whether a part the completion ``marker`` lists is no longer published (an unreadable marker: True)."""
    try:
        parts = read_json(marker)["parts"]
        return any(not (wd.candidates / part["path"] / "candidates.parquet").is_file() for part in parts)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("candidates: completion marker %s of an expired night is unreadable (%s): removed with it",
                    marker, exc)
        return True


def _remove_expired(wd: WorkDir, markers: list[Path], partitions: list[Path]) -> None:
    """Retention: the markers first (a marker must never outlive the night it describes, even if this process
    is killed in between), then the partitions. Tonight's night is published and marked already, so a path
    that cannot be removed (an NFS ``.nfsXXXX`` file held open by a reader) fails nothing: a warning names it
    and the next night's retention retries."""
    for path in [*markers, *partitions]:
        try:
            if path in markers:
                path.unlink(missing_ok=True)
            else:
                remove_dir(path)
        except OSError as exc:
            log.warning("candidates: retention could not remove %s (%s); left in place, the next night retries "
                        "(remove it by hand if it stays)", path, exc)
    if markers:
        fsync_dir(wd.candidates / "complete")


def _unmark_night(wd: WorkDir, day: dt.date) -> bool:
    """Remove night ``day``'s completion marker, durably, before a part of it is replaced: the marker describes
    the parts being replaced, so a process killed after the swap must not leave it saying "complete" for lists
    it does not describe. :func:`_mark_night` writes it again once the new part is published. Returns whether
    there was a marker."""
    marker = wd.night_marker(day)
    if not marker.exists():
        return False
    marker.unlink()
    fsync_dir(marker.parent)
    return True


def _remark_night(wd: WorkDir, day: dt.date, shard: Shard | None) -> None:
    """After a publish that failed with the marker removed (:func:`_unmark_night`), mark the night again from
    the parts now published: ``atomic_dir`` put the replaced part back, so the marker is the one removed, byte
    for byte (:func:`_mark_night` depends on the published parts alone). A failure here is logged: the night
    then stays unmarked until a rerun, and the publish's own error is the one raised."""
    try:
        _mark_night(wd, day, shard)
    except Exception as exc:  # noqa: BLE001 (the publish's error matters more)
        log.warning("candidates: night %s was complete before this failed publish; marking it again failed "
                    "(%s): it stays unmarked until a rerun", day, exc)


def _mark_night(wd: WorkDir, day: dt.date, shard: Shard | None) -> Path | None:
    """Write the night's completion marker (:meth:`WorkDir.night_marker`) once all its parts are published,
    and return it; None while shards of the night are missing (a marker left from a removed shard goes).

    The marker lists each part (path, rows, users, manifest sha256), the totals, the model and the features
    manifest's sha256; it depends on nothing else, so a rerun with the same model and features rewrites it byte
    for byte. Raises ShardLayoutError when the N published shards do not share one model and one feature build
    (shards that published in the same instant, which the checks before publishing cannot see).
    """
    marker = wd.night_marker(day)
    names = [None] if shard is None else [f"shard={i}-of-{shard.count}" for i in range(shard.count)]
    parts = {name: wd.candidates_partition(day, name) / "manifest.json" for name in names}
    missing = [name for name, path in parts.items() if not path.is_file()]
    if missing:
        marker.unlink(missing_ok=True)
        log.info("candidates: night %s not complete yet: %d of %d shards published (missing %s)", day,
                 len(parts) - len(missing), len(parts), ", ".join(map(str, missing)))
        return None
    manifests = {name: read_json(path) for name, path in parts.items()}
    n_models = _distinct_models([m["model"] for m in manifests.values()])
    features = {m["features"]["manifest"]["sha256"] for m in manifests.values()}
    first = next(iter(manifests.values()))
    recorded = [_recorded_settings(m) for m in manifests.values()]
    differ = sorted({d for i, a in enumerate(recorded) for b in recorded[i + 1:] for d in _settings_differ(a, b)})
    if n_models > 1 or len(features) > 1 or differ:
        marker.unlink(missing_ok=True)
        raise ShardLayoutError(
            f"night {day}: its {len(parts)} published shards were scored with {n_models} different model(s), "
            f"{len(features)} feature build(s){' and other settings (' + '; '.join(differ) + ')' if differ else ''} "
            "(shards that published in the same instant); the night is not marked complete. Remove its shards "
            "and rerun them all with one pinned model (--model models:/NAME/VERSION) and one config")
    write_json(marker, {
        "date": day.isoformat(),
        "layout": "whole" if shard is None else f"{shard.count} shards",
        "parts": [{"path": str(path.parent.relative_to(wd.candidates)), "rows": manifests[name]["rows"],
                   "users": manifests[name]["users"], "manifest_sha256": fingerprint(path)["sha256"]}
                  for name, path in parts.items()],
        "rows": sum(m["rows"] for m in manifests.values()),
        "users": sum(m["users"] for m in manifests.values()),
        "model": first["model"],
        "features_manifest_sha256": first["features"]["manifest"]["sha256"],
        "night_settings": _recorded_settings(first),
    }, atomic=True)
    log.info("candidates: night %s complete (%s) → %s", day, "whole" if shard is None else f"{shard.count} shards",
             marker)
    return marker


def _check_layout(wd: WorkDir, day: dt.date, shard: Shard | None) -> None:
    """A night is written whole or by the shards of ONE split; raises ShardLayoutError naming what is there."""
    whole, shards = wd.candidates_partition(day), wd.candidate_shards(day)
    if shard is None and shards:
        raise ShardLayoutError(f"{day} is already split into shards ({', '.join(shards)} under {wd.candidates}): "
                               "a night is written whole or by shards, not both; run with --shard, or remove "
                               "them to write the night whole")
    if shard is None:
        return
    if (whole / "candidates.parquet").is_file():
        raise ShardLayoutError(f"{whole} holds the whole night: a night is written whole or by shards, not "
                               "both; run without --shard, or remove it to split the night")
    other = [name for name in shards if not name.endswith(f"-of-{shard.count}")]
    if other:
        raise ShardLayoutError(f"{day} is already split another way ({', '.join(other)} under {wd.candidates}), "
                               f"not as --shard {shard}; use the same N for every shard of a night, or remove "
                               "them")


def _previous_parts(wd: WorkDir, day: dt.date, part: str | None, user_dtype: pl.DataType) -> list[Path]:
    """:meth:`WorkDir.previous_candidates` of ``part`` (a shard's name, or None), unless that is the same shard's
    partition written with another user id dtype (``data.user_id_type`` changed since): ids then hash to other
    shards (the number 7 by splitmix64, the text "7" by BLAKE2b), so the same shard held other users, and the
    whole previous night (or all its shards) is read instead, to be cut to this shard's users."""
    parts = wd.previous_candidates(day, part)
    if part is not None and len(parts) == 1 and parts[0].parent.name == part:
        try:
            written = pl.read_parquet_schema(parts[0] / "candidates.parquet").get(schema.USER_ID)
        except (pl.exceptions.PolarsError, OSError):  # damaged: read_candidates says so (exit 2, what to do)
            return parts
        if written is not None and written != user_dtype:
            return wd.previous_candidates(day, None)
    return parts


def _previous_lists(previous: list[Path], shard: Shard | None, user_dtype: pl.DataType) -> pl.DataFrame | None:
    """The previous night's lists (its partitions, :meth:`WorkDir.previous_candidates`) to measure drift
    against: of ``shard``'s users only, for a shard (the previous night may have been written whole, or split
    another way). A user's shard is that of its id in tonight's ``user_dtype`` (data.user_id_type may have
    changed since: the text id "7" and the number 7 hash apart); a previous id with no counterpart tonight
    (text that is no number) belongs to no shard and is left out."""
    if not previous:
        return None
    table = pl.concat([read_candidates(path) for path in previous])
    if shard is None:
        return table
    ids = table.select(schema.USER_ID).unique()
    tonight = schema.with_id_dtype(ids, schema.USER_ID, user_dtype)  # row for row; null: no counterpart
    mine = tonight.select(pl.col(schema.USER_ID).is_not_null() & in_shard(shard, user_dtype)).to_series()
    return table.filter(pl.col(schema.USER_ID).is_in(ids.filter(mine)[schema.USER_ID].implode()))


def _manifest(cfg: Config, day: dt.date, rows: int, stats: dict[str, Any], model: dict[str, Any], feats: FeatureSet,
              wd: WorkDir, shard: Shard | None, device: torch.device) -> dict[str, Any]:
    c = cfg.candidates
    return {
        "date": day.isoformat(),
        "shard": None if shard is None else {"index": shard.index, "count": shard.count},
        "rows": rows,
        **{k: v for k, v in stats.items() if k != "search"},
        "k": c.k,
        "model": model,
        "device": str(device),  # where the user vectors were computed; FAISS searched on the CPU
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


def _track(tracker: JobRun, manifest: dict[str, Any], drift: dict[str, Any], retention: dict[str, Any],
           target: Path, shard: Shard | None) -> None:
    model = manifest["model"]
    tracker.set_tags({**{f"model.{k}": v for k, v in model.items()}, "drift.passed": drift["passed"]})
    numbers = {k: v for k, v in {**manifest, **manifest["search"]}.items() if isinstance(v, int | float)}
    numbers |= {f"drift/{k}": v for k, v in drift.items() if isinstance(v, int | float) and k != "passed"}
    numbers["retention/removed"] = len(retention["removed"])
    tracker.log_metrics(numbers)
    where = f"candidates/{target.name}" if shard is None else f"candidates/{shard.name}/{target.name}"
    for name in ("manifest.json", "drift.json", "retention.json"):
        tracker.log_artifact(target / name, where)
