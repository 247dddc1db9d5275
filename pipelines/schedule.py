"""Unattended runs: the run date, success markers, per-job locks, and the training checkpoint directory.

A run is identified by (job, run date, config hash). Its success marker is
``<work_dir>/runs/<job>/<YYYY-MM-DD>.json``; a run whose marker holds the same config hash is done. A
different config for the same date is a different run (and its marker replaces the old one).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.workdir import WorkDir
from recsys.config import Config, non_default, without_budget
from recsys.storage import DamagedFileError, exclusive_writer, read_json, remove_stale_temps, write_json

log = logging.getLogger(__name__)

# What each scheduled job produces, as WorkDir attributes (recorded in the marker).
OUTPUTS: dict[str, tuple[str, ...]] = {
    "train": ("model",),
    "run": ("features", "model", "evaluation", "candidates"),
}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class LockedError(RuntimeError):
    """Another process holds the job's lock on this work directory."""


def today_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def parse_run_date(text: str) -> dt.date:
    """``YYYY-MM-DD`` → date; raises ``ValueError`` naming the expected format."""
    if _DATE.fullmatch(text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            pass  # e.g. 2024-02-30: reported below like any other malformed date
    raise ValueError(f"run date {text!r} is not a valid date of the form YYYY-MM-DD")


def config_hash(cfg: Config) -> str:
    """SHA-256 of the resolved config without ``work_dir`` (the marker already lives inside it), of the keys
    that differ from their defaults only (:func:`recsys.config.non_default`: a key added by an upgrade leaves
    the hash of existing runs as it was)."""
    tree = cfg.to_dict()
    tree.pop("work_dir", None)
    tree = non_default(tree, Config().to_dict())
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


# The config a training run's outcome depends on (recsys.checkpoint.run_identity checks the rest: the sequences'
# contents). Evaluation (but its exclude_seen, which picks the best epoch), candidates and tracking keys change
# nothing of it: a night the drift gate rejected, retried with a looser threshold, resumes its finished training
# (the same model, the same version, the lists that were inspected) instead of training a new one.
_TRAINING_SECTIONS = ("data", "features", "model", "train")


def training_hash(cfg: Config) -> str:
    """SHA-256 of the non-default keys of ``data``, ``features``, ``model``, ``train`` (less its time budget,
    :func:`recsys.config.without_budget`, and ``train.progress``) and ``evaluate.exclude_seen``."""
    def sections(tree: dict) -> dict:
        kept = {name: tree[name] for name in _TRAINING_SECTIONS}
        kept["train"] = {k: v for k, v in without_budget(kept["train"]).items() if k != "progress"}
        kept["evaluate"] = {"exclude_seen": tree["evaluate"]["exclude_seen"]}
        return kept

    tree = non_default(sections(cfg.to_dict()), sections(Config().to_dict()))
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


# In a checkpoint directory: its run succeeded (the job's marker was written), so its last.ckpt is the end of a
# finished training, kept for a rerun of the date, not the resume point of a killed one. Removed when a training
# starts there again (pipelines.train).
FINISHED = "finished"


def checkpoint_dir(cfg: Config, run_date: dt.date) -> Path:
    """``<work_dir>/checkpoints/<YYYY-MM-DD>-<training hash[:12]>``: a new date or training config starts afresh.

    Only what decides the training (:func:`training_hash`) names the directory: a run stopped under one time
    budget resumes under another (as in :func:`recsys.checkpoint.run_identity`), and a retry that changes
    evaluation, candidates or tracking keys resumes the finished training.
    """
    return WorkDir.of(cfg).checkpoints / f"{run_date.isoformat()}-{training_hash(cfg)[:12]}"


def _flock(fd: int, mode: int, patience_s: float = 1.0) -> None:
    """``flock(fd, mode)`` without waiting for a job, but with ``patience_s`` for a probe: `recsys status`
    takes every lock for a moment to see whether it is held, which must not make a starting job exit 4.
    Raises BlockingIOError if the lock is still held after ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _holder() -> str:
    """What a lock file records about its holder: ``pid <pid> on <host>, started <UTC time>``. The host tells
    one container's pid 1 from another's (work directories on shared storage, a new pod every night)."""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}"


def _read_holder(fd: int) -> str:
    """The holder a lock file names, as written by :func:`_holder` (a bare pid: written by an earlier version)."""
    text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else text or "an unknown process"


@contextmanager
def job_lock(work_dir: Path, job: str) -> Iterator[Path]:
    """Hold ``<work_dir>/.locks/<job>.lock`` (``flock``, non-blocking) for the block; the kernel releases it
    when the process dies. The file names the holder (:func:`_holder`). Raises :class:`LockedError` naming the
    file and the holder's pid, host and start time."""
    path = Path(work_dir) / ".locks" / f"{job}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LockedError(
            f"{path} is held by {holder}: another `recsys {job}` is running on this work directory; "
            "wait for it to finish (the lock is released when that process exits)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_holder()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


WORK_DIR_LOCK = "work_dir"  # .locks/work_dir.lock: not a job's, left out of lock_holders


@contextmanager
def work_dir_lock(work_dir: Path, job: str, shared: bool) -> Iterator[Path]:
    """Hold ``<work_dir>/.locks/work_dir.lock`` for the block: exclusive for a job that rewrites the feature set
    or the model (features, train, run), shared for one that only reads them (evaluate, candidates and its
    shards), so that no job reads a feature set or model another one is rewriting. Non-blocking, released by
    the kernel when the process dies; raises :class:`LockedError` naming the file and, for an exclusive
    holder, its job, pid, host and start time. An exclusive holder is the only writer in the work directory,
    so it clears every leftover temporary entry there, whoever left it (:func:`recsys.storage.exclusive_writer`)."""
    path = Path(work_dir) / ".locks" / f"{WORK_DIR_LOCK}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        os.close(fd)
        doing = (f"`recsys {holder}` is rewriting the features or the model" if holder
                 else "jobs that read the features or the model (evaluate, candidates) are running")
        raise LockedError(
            f"{path} is held: {doing} on this work directory; `recsys {job}` "
            f"{'reads' if shared else 'rewrites'} them, so it waits for that to finish (the lock is released "
            "when those processes exit; `recsys status` names the running jobs)"
        ) from None
    try:
        # The file names the exclusive holder, if any: written by it, and emptied by any holder after (a
        # killed holder's name is stale once anyone else holds the lock). Shared holders are named by their
        # job locks.
        os.ftruncate(fd, 0)
        if shared:
            yield path
        else:
            os.pwrite(fd, f"{job} ({_holder()})\n".encode(), 0)
            with exclusive_writer(work_dir):
                yield path
    finally:
        os.close(fd)


def lock_holders(work_dir: Path) -> dict[str, str]:
    """``{job lock name: holder}`` (``pid <pid> on <host>, started <time>``) for every lock of ``work_dir`` held
    right now (probed with a non-blocking ``flock`` that is released at once; a free lock is left as it was)."""
    held = {}
    for path in sorted((Path(work_dir) / ".locks").glob("*.lock")):
        if path.stem == WORK_DIR_LOCK:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held[path.stem] = _read_holder(fd)
        finally:
            os.close(fd)  # releases a lock we got
    return held


@dataclass(frozen=True)
class ScheduledRun:
    """One (job, run date, config) of a work directory."""

    cfg: Config
    job: str
    run_date: dt.date

    @property
    def marker(self) -> Path:
        return Path(self.cfg.work_dir) / "runs" / self.job / f"{self.run_date.isoformat()}.json"

    def done(self) -> dict[str, Any] | None:
        """The success marker if this date already succeeded with this config, else None."""
        if not self.marker.is_file():
            return None
        try:
            payload = read_json(self.marker)
        except DamagedFileError as exc:  # written atomically, so damaged from outside: rerunning a date is safe
            log.warning("%s; taken as not done: this date runs again and rewrites it", exc)
            return None
        return payload if payload.get("config_hash") == config_hash(self.cfg) else None

    def mark_done(self) -> dict[str, Any]:
        """Write the success marker atomically: date, config hash, outputs, registered model version."""
        wd = WorkDir.of(self.cfg)
        report = wd.model / "train_report.json"
        payload = {
            "job": self.job,
            "run_date": self.run_date.isoformat(),
            "config_hash": config_hash(self.cfg),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "outputs": {name: str(getattr(wd, name).resolve()) for name in OUTPUTS.get(self.job, ())},
            "model_version": read_json(report).get("registered_version") if report.is_file() else None,
        }
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.marker.parent)
        write_json(self.marker, payload, atomic=True)
        return payload

    def discard_checkpoints(self) -> None:
        """Forget this run's resume point (``--force`` redoes the run from scratch)."""
        shutil.rmtree(checkpoint_dir(self.cfg, self.run_date), ignore_errors=True)

    def prune_checkpoints(self) -> None:
        """After success: keep this run's best checkpoint and its ``last.ckpt`` (a rerun of the date with another
        evaluation, candidates or tracking key resumes the finished training instead of training again, warm-started
        from its own first result; a run the time budget cut goes on from there under a larger budget or none; the
        next night's success removes both, and so does another config's success of this date unless the budget
        cut the run) and drop other runs' directories: finished ones,
        and unfinished ones (with a ``last.ckpt``) of earlier dates, since a later night has now succeeded (a
        killed night stays resumable until then). Unfinished ones of this date (another config) or of later
        dates (a backfill running an older date) are kept so that they can still resume. A directory that
        cannot be removed is named in a warning and left for the next success: the run's output is already
        published and marked done."""
        # here, not at the top: recsys.checkpoint imports Lightning, which the CLI should not
        from recsys.checkpoint import LAST, cut_by_budget

        current = checkpoint_dir(self.cfg, self.run_date)
        # its last.ckpt stays; as the end of a finished run (see FINISHED) unless the time budget cut it: then it is
        # a resume point that another config's success of this date keeps, as it keeps a killed run's
        if current.is_dir() and not cut_by_budget(current / f"{LAST}.ckpt"):
            (current / FINISHED).touch()
        for other in WorkDir.of(self.cfg).checkpoints.glob("*"):
            if not other.is_dir() or other == current:
                continue
            unfinished = (other / f"{LAST}.ckpt").exists() and not (other / FINISHED).exists()
            if unfinished and not _dated_before(other.name, self.run_date):
                continue
            if (other / FINISHED).exists() and _dated_after(other.name, self.run_date):  # a backfill: that later
                continue  # night's rerun resumes it, as a rerun of this one resumes ours
            try:
                shutil.rmtree(other)
            except OSError as exc:
                log.warning("%s %s is done; removing the old checkpoint directory %s failed (%s): the next "
                            "successful run retries, or remove it by hand", self.job, self.run_date, other, exc)


def _dated_after(name: str, day: dt.date) -> bool:
    """Whether checkpoint directory ``name`` (``<YYYY-MM-DD>-<hash>``) is of a date after ``day``."""
    try:
        return dt.date.fromisoformat(name[:10]) > day
    except ValueError:
        return False


def _dated_before(name: str, day: dt.date) -> bool:
    """Whether checkpoint directory ``name`` (``<YYYY-MM-DD>-<hash>``) is of a date before ``day``."""
    try:
        return dt.date.fromisoformat(name[:10]) < day
    except ValueError:
        return False  # not a checkpoint directory of a run: not ours to judge
