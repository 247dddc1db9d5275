"""Artifact writing that never leaves half-written output: write into a temporary sibling, then rename."""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

from recsys.faults import fault_point

log = logging.getLogger(__name__)

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
# .<name>.tmp-<pid>@<host>: the writer's process and machine (work directories may sit on shared storage);
# names without a host are of this machine (written by earlier versions).
_STALE = re.compile(r"\.(?P<name>.+)(?P<tag>\.tmp-|\.old-)(?P<pid>\d+)(?:@(?P<host>[^/]+))?")
_HOST = socket.gethostname()
STALE_AFTER_S = 2 * 86_400  # no atomic write takes this long: older temps are leftovers whoever wrote them


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    On any exception the temporary directory is removed and ``target`` keeps its previous content. Leftovers
    of a process killed inside the block (or between the two renames) are cleared first, see
    :func:`remove_stale_temps`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = target.parent / f".{target.name}{TMP_TAG}{_writer()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}{OLD_TAG}{_writer()}"
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


def atomic_write_bytes(path: str | Path, data: bytes, fault: str | None = None) -> None:
    """Write ``path`` via a temporary sibling, fsync and ``os.replace``: readers see old or new, never half.

    ``fault`` names a :func:`recsys.faults.fault_point` reached once the bytes are written, before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_TAG}{_writer()}"
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


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>@<host>`` / ``.<name>.old-<pid>@<host>`` entries in ``directory`` that no
    writer will finish: of this machine, when process ``pid`` is gone; of any machine (another host sharing the
    storage, an earlier container whose pid 1 looks alive in this one), once older than
    :data:`STALE_AFTER_S`. A writer on another host is never judged by this machine's process table.

    An ``.old-`` entry whose ``<name>`` is missing (killed between the two renames of :func:`atomic_dir`) is
    renamed back to ``<name>``: the previous complete output wins over an unfinished one. Returns what was
    removed or restored. Entries of live processes are left alone.
    """
    directory = Path(directory)
    touched = []
    now = time.time()
    for entry in sorted(directory.glob(".*")):
        match = _STALE.fullmatch(entry.name)
        if match is None:
            continue
        pid, here = int(match["pid"]), match["host"] in (None, _HOST)
        if here and pid == os.getpid():
            continue  # this process's own, in use
        old = now - entry.lstat().st_mtime > STALE_AFTER_S
        if not (old or (here and not _alive(pid))):
            continue
        target = directory / match["name"]
        if match["tag"] == OLD_TAG and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        touched.append(entry)
    return touched


def _writer() -> str:
    """``<pid>@<host>``: who writes a temporary entry (at call time: a forked process is another writer)."""
    return f"{os.getpid()}@{_HOST}"


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


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the job that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Size, mtime and SHA-256 of a file, to record which input an artifact was built from."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime), "sha256": digest.hexdigest()}
