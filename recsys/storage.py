"""Artifact writing that never leaves half-written output: write into a temporary sibling, then rename."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys.faults import fault_point

log = logging.getLogger(__name__)

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
# .<name>.tmp-<pid>-<token>@<host>: the writer's process and machine (work directories may sit on shared
# storage). The token is drawn once per process: a pid alone names another process after a restart (pid 1 of
# every container on a fixed hostname), so only the exact <pid>-<token>@<host> of this process is its own.
# Names without a token or a host were written by earlier versions (without a host: of this machine).
_STALE = re.compile(r"\.(?P<name>.+)(?P<tag>\.tmp-|\.old-)(?P<pid>\d+)(?:-(?P<token>[0-9a-f]+))?(?:@(?P<host>[^/]+))?")
_HOST = socket.gethostname()
_TOKENS: dict[int, str] = {}  # pid → token: a forked child draws its own
STALE_AFTER_S = 2 * 86_400  # no atomic write takes this long: older temps are leftovers whoever wrote them
_EXCLUSIVE: set[Path] = set()  # roots this process is the only writer under, see exclusive_writer


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    On any exception the temporary directory is removed and ``target`` keeps its previous content. Leftovers
    of a process killed inside the block (or between the two renames) are cleared first, see
    :func:`remove_stale_temps`. Durable once it returns: every file and directory of the new content is
    fsynced before the rename and the parent directory after it, so a success marker written afterwards never
    survives a power cut that the output itself does not (a rename is only a directory entry: without these
    fsyncs the renamed files can come back empty).
    """
    target = Path(target)
    make_dirs(target.parent)
    remove_stale_temps(target.parent)
    tmp = target.parent / f".{target.name}{TMP_TAG}{_writer()}"
    old = target.parent / f".{target.name}{OLD_TAG}{_writer()}"
    for own in (tmp, old):  # this process's own, of an earlier write whose clean-up failed: in the way
        _remove(own)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
        fault_point(f"atomic-swap:{target.name}")
    try:
        os.replace(tmp, target)
    except BaseException:  # e.g. an I/O error: the previous output goes back in place, the new one away
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)  # the rename itself: durable before the caller marks anything done
    if old.exists():
        try:
            shutil.rmtree(old)
        except OSError as exc:  # published already: a leftover of the old output must not fail the job
            log.warning("%s is published; removing its previous version %s failed (%s): the next atomic write "
                        "into %s removes it", target, old, exc, target.parent)


def remove_dir(path: str | Path) -> None:
    """Remove the directory ``path`` so that it is never seen half-deleted: renamed to a temporary sibling
    first (one atomic step), then deleted; if the process dies in between, :func:`remove_stale_temps`
    finishes the job on the next atomic write into that directory."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_TAG}{_writer()}"
    os.replace(path, tmp)
    shutil.rmtree(tmp)


SCRATCH_NAMES = ("init-model", "scored-model", "champion-model")  # the downloads of train, candidates, the gate


@contextmanager
def scratch_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A private working directory ``<parent>/.<name>.tmp-<writer>`` for the block, removed when it ends.
    ``parent`` is the work directory, not the system's temp directory: what a killed process leaves there is
    cleared by the next ``scratch_dir`` of any of :data:`SCRATCH_NAMES` (or any :func:`remove_stale_temps` of ``parent``)
    once its writer is gone, where nothing ever sweeps ``/tmp``. A downloaded model is as big as the one the
    job writes, so it belongs on the work directory's disk anyway."""
    if name not in SCRATCH_NAMES:
        raise ValueError(f"scratch_dir: {name!r} is not one of SCRATCH_NAMES {SCRATCH_NAMES}")
    parent = Path(parent)
    make_dirs(parent)
    remove_stale_temps(parent, only=SCRATCH_NAMES)  # any job's: a reader after a killed train clears its download
    path = parent / f".{name}{TMP_TAG}{_writer()}"
    _remove(path)  # this process's own, of an earlier block whose clean-up failed
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes, fault: str | None = None) -> None:
    """Write ``path`` via a temporary sibling, fsync and ``os.replace``, then fsync the directory: readers see
    old or new, never half, and after a power cut the file is there whole once this returned.

    ``fault`` names a :func:`recsys.faults.fault_point` reached once the bytes are written, before the rename.
    """
    path = Path(path)
    make_dirs(path.parent)
    tmp = temp_sibling(path)
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if fault is not None:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temp_sibling(path: Path) -> Path:
    """``.<name>.tmp-<writer>`` beside ``path``: where this process writes it before the rename, named so that
    :func:`remove_stale_temps` clears it if the process dies first."""
    return path.parent / f".{path.name}{TMP_TAG}{_writer()}"


def make_dirs(directory: Path) -> None:
    """``mkdir -p directory``, durably: each directory it creates is fsynced into its parent, top down (a new
    directory is an entry of its parent; without this the first output under a new directory, e.g. a new
    shard's partitions, could vanish in a power cut that its success marker survives)."""
    missing = []
    here = directory
    while not here.exists():
        missing.append(here)
        here = here.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def fsync_dir(directory: str | Path) -> None:
    """fsync ``directory`` itself: makes its entries (a rename, a new or removed name) durable. A file system
    that cannot fsync a directory (EINVAL / ENOTSUP: some network and FUSE mounts) is left to its own
    guarantees rather than failing a write whose files are already durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up, ``root`` last (symlinks skipped)."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(here) / name
            if path.is_symlink():
                continue
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(here)


@contextmanager
def exclusive_writer(root: str | Path) -> Iterator[None]:
    """Declare for the block that this process is the only writer under ``root``: the caller holds the
    work directory's exclusive lock (``pipelines.schedule.work_dir_lock``). :func:`remove_stale_temps` then
    clears every leftover there whatever its host or age: no other process can be writing it."""
    root = Path(root).resolve()
    _EXCLUSIVE.add(root)
    try:
        yield
    finally:
        _EXCLUSIVE.discard(root)


def remove_stale_temps(directory: str | Path, exclusive: bool | None = None,
                       only: tuple[str, ...] | None = None) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-<token>@<host>`` / ``.<name>.old-…`` entries in ``directory`` that no writer
    will finish: of this machine, when process ``pid`` is gone or is this process under another token (an
    earlier container's pid 1); of any machine (another host sharing the storage, an earlier container whose
    pid looks alive in this one), once older than :data:`STALE_AFTER_S`. A writer on another host is never
    judged by this machine's process table. ``exclusive`` (default: whether ``directory`` lies under an
    :func:`exclusive_writer` root of this process) clears every entry that is not this process's own, of any
    host and age: e.g. what a run killed in another pod left before this one took the exclusive lock.

    An ``.old-`` entry whose ``<name>`` is missing (killed between the two renames of :func:`atomic_dir`) is
    renamed back to ``<name>``: the previous complete output wins over an unfinished one. Returns what was
    removed or restored. Entries of live writers are left alone, and so is an entry that cannot be removed (an
    NFS ``.nfsXXXX`` file a reader holds open, a permission): a warning names it and the others are still
    cleared, so one stuck leftover never fails a job. ``only``: the entries of these output names alone.
    """
    directory = Path(directory)
    if exclusive is None:
        exclusive = _held_exclusively(directory)
    touched = []
    now = time.time()
    for entry in sorted(directory.glob(".*")):
        match = _STALE.fullmatch(entry.name)
        if match is None or f"{match['pid']}-{match['token']}@{match['host']}" == _writer():
            continue  # not a temporary entry, or this process's own (in use)
        if only is not None and match["name"] not in only:
            continue
        try:
            if not (exclusive or _abandoned(match, entry, now)):
                continue
            target = directory / match["name"]
            if match["tag"] == OLD_TAG and not target.exists():
                os.replace(entry, target)
            else:
                _remove(entry)
        except OSError as exc:
            if not entry.exists():  # another job cleared or restored it first (two readers starting together)
                continue
            log.warning("could not clear the leftover %s (%s); left in place, the rest is cleared: a later run "
                        "retries, or remove it by hand once nothing holds it open", entry, exc)
            continue
        touched.append(entry)
    return touched


def _abandoned(match: re.Match[str], entry: Path, now: float) -> bool:
    """Whether the writer of ``entry`` (parsed by :data:`_STALE`) will never finish it."""
    if now - entry.lstat().st_mtime > STALE_AFTER_S:
        return True
    if match["host"] not in (None, _HOST):
        return False
    pid = int(match["pid"])
    return pid == os.getpid() or not _alive(pid)  # this pid with another token: an earlier process


def _held_exclusively(directory: Path) -> bool:
    here = directory.resolve()
    return any(here == root or root in here.parents for root in _EXCLUSIVE)


def _remove(entry: Path) -> None:
    """Remove the file, link or directory ``entry`` if it exists."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _writer() -> str:
    """``<pid>-<token>@<host>``: who writes a temporary entry (at call time: a forked process is another
    writer, with a token of its own)."""
    pid = os.getpid()
    return f"{pid}-{_TOKENS.setdefault(pid, secrets.token_hex(6))}@{_HOST}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | Path, payload: dict[str, Any], atomic: bool = False) -> None:
    """Write ``payload`` as indented JSON; ``atomic`` goes through :func:`atomic_write_bytes`."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    if atomic:
        atomic_write_bytes(path, text.encode("utf-8"))
    else:
        Path(path).write_text(text, encoding="utf-8")


class DamagedFileError(ValueError):
    """A file an earlier job wrote that cannot be read any more (truncated, overwritten, not what its name says):
    the message names it and what rebuilds it. The CLI exits 2 with it."""


def damaged(path: str | Path, exc: BaseException, fix: str) -> DamagedFileError:
    """The :class:`DamagedFileError` for ``path``, whose reading raised ``exc``; ``fix`` says what to do."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DamagedFileError(f"{path} is damaged and cannot be read ({type(exc).__name__}: {reason[:300]}); {fix}")


def read_json(path: str | Path, fix: str = "restore it, or rerun the job that writes it") -> dict[str, Any]:
    """The JSON object in ``path``. Raises FileNotFoundError when it is missing and :class:`DamagedFileError`
    (naming it and ``fix``) when it is not a JSON object: a truncated or overwritten file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the job that writes it first")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(path, exc, fix) from None
    if not isinstance(payload, dict):
        raise damaged(path, TypeError(f"holds a JSON {type(payload).__name__}, not an object"), fix)
    return payload


def read_parquet_file(path: str | Path, fix: str, **kwargs: Any) -> Any:
    """``pl.read_parquet(path)`` (never a glob pattern: ``run[1]`` is a directory name); a file that is no
    readable Parquet raises :class:`DamagedFileError` naming it and ``fix``."""
    import polars as pl

    try:
        return pl.read_parquet(path, glob=False, **kwargs)
    except (pl.exceptions.PolarsError, OSError) as exc:
        if not_damage(exc):
            raise
        raise damaged(path, exc, fix) from None


def not_damage(exc: BaseException) -> bool:
    """Whether reading failed for a reason other than the file's bytes: missing, not permitted, another OS error
    than an I/O error (the file is fine; rebuilding it would not help)."""
    return isinstance(exc, OSError) and exc.errno != errno.EIO


def shown(path: str | Path) -> str:
    """``path`` for an error message: a relative one also as the absolute path it was looked up at (config paths
    are relative to the current directory, which a scheduler may not have set to the project's)."""
    path = Path(path)
    return str(path) if path.is_absolute() else f"{path} (that is {Path.cwd() / path}: relative paths are relative " \
        "to the current directory)"


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Size, mtime and SHA-256 of a file, to record which input an artifact was built from."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime), "sha256": digest.hexdigest()}
