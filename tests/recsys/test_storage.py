"""Atomic writes and the clean-up of what a killed writer leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.storage import atomic_dir, atomic_write_bytes, remove_stale_temps, scratch_dir


@pytest.fixture(scope="module")
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_processes_are_removed(tmp_path: Path, dead_pid: int) -> None:
    (tmp_path / f".model.tmp-{dead_pid}").mkdir()
    (tmp_path / f".last.ckpt.tmp-{dead_pid}").write_bytes(b"half")
    (tmp_path / "model").mkdir()
    (tmp_path / ".keep").write_text("not ours")
    assert len(remove_stale_temps(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "model"]


def test_killed_between_the_renames_restores_the_previous_output(tmp_path: Path, dead_pid: int) -> None:
    old, new = tmp_path / f".model.old-{dead_pid}", tmp_path / f".model.tmp-{dead_pid}"
    old.mkdir()
    (old / "model.pt").write_text("previous")
    new.mkdir()
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "model.pt").read_text() == "previous"


def test_temps_of_live_processes_are_left_alone(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".model.tmp-{live.pid}").mkdir()
        assert remove_stale_temps(tmp_path) == []
    finally:
        live.kill()
        live.wait()


def test_atomic_dir_clears_a_dead_writers_leftovers(tmp_path: Path, dead_pid: int) -> None:
    (tmp_path / f".out.tmp-{dead_pid}").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_bytes_leaves_no_temp_on_error(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "f.json", "not bytes")  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_bytes() == b"{}"


def test_a_failed_publish_puts_the_previous_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import recsys.storage as storage

    target = tmp_path / "model"
    with atomic_dir(target) as out:
        (out / "weights").write_text("yesterday")
    real = os.replace

    def failing_publish(src, dst):  # noqa: ANN001, ANN202
        if Path(src).name.startswith(".model.tmp-"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", failing_publish)
    with pytest.raises(OSError, match="Input/output error"), atomic_dir(target) as out:
        (out / "weights").write_text("tonight")
    assert (target / "weights").read_text() == "yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old copy left


def test_a_leftover_of_the_old_output_does_not_fail_a_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import recsys.storage as storage

    target = tmp_path / "model"
    with atomic_dir(target) as out:
        (out / "weights").write_text("yesterday")
    real = storage.shutil.rmtree

    def busy(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202  (NFS: a reader holds a file open)
        if ".old-" in Path(path).name:
            raise OSError(16, "Device or resource busy")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(storage.shutil, "rmtree", busy)
    with caplog.at_level("WARNING", logger="recsys.storage"), atomic_dir(target) as out:
        (out / "weights").write_text("tonight")
    assert (target / "weights").read_text() == "tonight"
    assert "is published; removing its previous version" in caplog.text


def test_temps_of_another_machine_are_judged_by_age_not_by_this_machines_processes(
    tmp_path: Path, dead_pid: int
) -> None:
    """Shared storage: a writer on another host is alive whatever this host's process table says; any
    leftover older than STALE_AFTER_S is stale, even with a pid alive here (pid 1 of every container)."""
    import os
    import time

    from recsys.storage import STALE_AFTER_S

    other = tmp_path / f".model.tmp-{dead_pid}@another-host.example"
    other.mkdir()  # written just now on another machine: its writer may be running
    mine = tmp_path / f".model.tmp-{dead_pid}@{__import__('socket').gethostname()}"
    mine.mkdir()  # this machine, process gone: stale
    old = tmp_path / f".features.tmp-1@{__import__('socket').gethostname()}"
    old.mkdir()  # pid 1 is alive here, but nobody writes for two days
    week_ago = time.time() - STALE_AFTER_S - 7 * 86_400
    os.utime(old, (week_ago, week_ago))
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted([mine.name, old.name])
    assert [p.name for p in tmp_path.iterdir()] == [other.name]
    os.utime(other, (week_ago, week_ago))
    assert remove_stale_temps(tmp_path) == [other] and list(tmp_path.iterdir()) == []


def test_a_writer_names_its_temporaries_with_its_pid_a_token_of_its_own_and_host(tmp_path: Path) -> None:
    import os
    import re
    import socket

    with atomic_dir(tmp_path / "out") as tmp:
        token = re.fullmatch(rf"\.out\.tmp-{os.getpid()}-([0-9a-f]+)@{re.escape(socket.gethostname())}", tmp.name)
        assert token is not None
    with atomic_dir(tmp_path / "out") as again:
        assert again.name == tmp.name  # drawn once per process
    child = subprocess.run([sys.executable, "-c", "from recsys.storage import _writer; print(_writer())"],
                           capture_output=True, text=True, check=True)
    assert token[1] not in child.stdout  # another process: another token, even if it had this pid


def test_atomic_dir_makes_the_new_content_durable_before_the_rename_and_the_rename_after(
    tmp_path: Path, fsync_log: list[tuple[str, ...]]
) -> None:
    """A power cut must never leave the renamed directory with empty files (nor the old content back) once
    atomic_dir returned, when the caller goes on to write a success marker: every file, subdirectory and the
    temporary directory are fsynced before the publishing rename, the parent directory after it."""
    target = tmp_path / "out"
    with atomic_dir(target) as out:
        (out / "old.txt").write_text("yesterday")
    fsync_log.clear()
    events = fsync_log
    with atomic_dir(target) as out:
        (out / "a.parquet").write_bytes(b"rows")
        (out / "sub").mkdir()
        (out / "sub" / "b.json").write_text("{}")
        tmp = str(out)
    publish = events.index(("replace", tmp, str(target)))
    synced = [path for kind, path, *_ in events[:publish] if kind == "fsync"]
    for path in (f"{tmp}/a.parquet", f"{tmp}/sub/b.json", f"{tmp}/sub", tmp):
        assert path in synced, (path, events)
    assert synced.index(f"{tmp}/sub/b.json") < synced.index(f"{tmp}/sub") < synced.index(tmp)
    assert ("fsync", str(tmp_path)) in events[publish + 1:], events
    assert (target / "sub" / "b.json").read_text() == "{}"


def test_atomic_write_bytes_makes_the_rename_durable(tmp_path: Path, fsync_log: list[tuple[str, ...]]) -> None:
    """The file is fsynced before the rename and its directory after it (a marker written this way survives a
    power cut once the call returned)."""
    events = fsync_log
    atomic_write_bytes(tmp_path / "marker.json", b"{}")
    kinds = [event[0] for event in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[1][2] == str(tmp_path / "marker.json") and events[2] == ("fsync", str(tmp_path))


def test_a_leftover_that_cannot_be_removed_is_named_and_the_rest_is_still_cleared(
    tmp_path: Path, dead_pid: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """NFS: a removed file a process still holds open becomes .nfsXXXX and its directory cannot be removed
    until that process closes it. That must not fail this write, nor every later one."""
    import recsys.storage as storage

    stuck, gone = tmp_path / f".model.tmp-{dead_pid}", tmp_path / f".evaluation.tmp-{dead_pid}"
    for leftover in (stuck, gone):
        leftover.mkdir()
        (leftover / "f").write_text("half")
    real = storage.shutil.rmtree

    def busy(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(path) == stuck:
            raise OSError(16, "Device or resource busy", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(storage.shutil, "rmtree", busy)
    with caplog.at_level("WARNING", logger="recsys.storage"):
        assert remove_stale_temps(tmp_path) == [gone]
        with atomic_dir(tmp_path / "model") as out:
            (out / "weights").write_text("tonight")
    assert (tmp_path / "model" / "weights").read_text() == "tonight"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stuck.name, "model"]
    assert f"could not clear the leftover {stuck}" in caplog.text and "Device or resource busy" in caplog.text


def test_leftovers_of_an_earlier_process_with_this_pid_and_host_are_not_taken_for_its_own(tmp_path: Path) -> None:
    """A container restarted on a fixed hostname runs as pid 1 every night: last night's killed write left
    .<name>.tmp-1@host / .<name>.old-1@host. This process has another token, so they are abandoned: cleared,
    and the publishing rename does not collide with a non-empty .old- directory."""
    import os
    import socket

    target = tmp_path / "model"
    with atomic_dir(target) as out:
        (out / "weights").write_text("yesterday")
    pid_host = f"{os.getpid()}@{socket.gethostname()}"
    earlier = [f".model.tmp-{pid_host}", f".model.old-{pid_host}", f".model.old-{os.getpid()}-0badc0de@"
               f"{socket.gethostname()}"]
    for name in earlier:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text("the night before")
    with atomic_dir(target) as out:
        (out / "weights").write_text("tonight")
    assert (target / "weights").read_text() == "tonight"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_exclusive_writer_clears_any_hosts_leftovers_and_restores_a_displaced_output(tmp_path: Path) -> None:
    """A run killed in another pod (another hostname) mid-swap left .features.old-… with features/ missing and
    its half-written .features.tmp-…. A process that holds the work directory alone knows nobody writes them:
    the previous output goes back, the rest goes, whatever the host or age."""
    from recsys.storage import exclusive_writer

    old, tmp = tmp_path / ".features.old-1-abc123@pod-a", tmp_path / ".features.tmp-1-abc123@pod-a"
    old.mkdir()
    (old / "manifest.json").write_text('{"rows_in": 200}')
    tmp.mkdir()
    model_tmp = tmp_path / ".model.tmp-7@pod-b"
    model_tmp.mkdir()
    assert remove_stale_temps(tmp_path) == []  # another host, just written: its writer may be running
    with exclusive_writer(tmp_path):
        assert sorted(remove_stale_temps(tmp_path / ".")) == sorted([old, tmp, model_tmp])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]
    assert (tmp_path / "features" / "manifest.json").read_text() == '{"rows_in": 200}'
    (tmp_path / ".model.tmp-7@pod-b").mkdir()
    assert remove_stale_temps(tmp_path) == []  # the block is over: back to judging by host and age
    assert remove_stale_temps(tmp_path, exclusive=True) == [tmp_path / ".model.tmp-7@pod-b"]


def test_a_file_system_that_cannot_fsync_a_directory_does_not_fail_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network / FUSE mounts answer fsync of a directory with EINVAL; the files are durable already."""
    import errno

    import recsys.storage as storage

    real = storage.os.fsync

    def no_dir_fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(storage.os, "fsync", no_dir_fsync)
    atomic_write_bytes(tmp_path / "marker.json", b"{}")
    with atomic_dir(tmp_path / "model") as out:
        (out / "model.pt").write_bytes(b"w")
    assert (tmp_path / "marker.json").read_bytes() == b"{}" and (tmp_path / "model" / "model.pt").exists()

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage.os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_bytes(tmp_path / "other.json", b"{}")


def test_directories_a_write_creates_are_fsynced_into_their_parents(
    tmp_path: Path, fsync_log: list[tuple[str, ...]]
) -> None:
    """A new directory is an entry of its parent: the first output under new directories (a new shard's
    partition, the first night marker) must not vanish in a power cut that a later marker survives. Each
    directory created is fsynced into its parent, top down, before the write's own rename."""
    events = fsync_log
    atomic_write_bytes(tmp_path / "a" / "b" / "marker.json", b"{}")
    synced = [path for kind, path, *_ in events if kind == "fsync"]
    assert synced[:2] == [str(tmp_path), str(tmp_path / "a")], events  # b into a, a into tmp_path: top down
    assert synced[-1] == str(tmp_path / "a" / "b")  # the rename, after it
    events.clear()
    with atomic_dir(tmp_path / "c" / "date=2024-01-01") as out:
        (out / "x").write_text("1")
    synced = [path for kind, path, *_ in events if kind == "fsync"]
    assert synced[0] == str(tmp_path) and synced[-1] == str(tmp_path / "c"), events
    events.clear()
    atomic_write_bytes(tmp_path / "a" / "b" / "other.json", b"{}")  # nothing new: as before
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events


def test_a_scratch_dir_lives_in_the_work_dir_for_the_block_and_a_killed_ones_is_cleared(tmp_path: Path) -> None:
    """Downloads (a warm start's model, the champion, the model candidates score with) go to a scratch directory
    in the work directory: one a killed job left there is cleared by the next job, where /tmp kept them forever."""
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from recsys.storage import scratch_dir\n"
        f"with scratch_dir({str(tmp_path)!r}, 'init-model') as d:\n"
        "    (d / 'model.pt').write_bytes(b'w'); print(d.name); sys.stdout.flush(); os._exit(9)")],
        capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert killed.returncode == 9, killed.stderr
    left = tmp_path / killed.stdout.strip()
    assert left.name.startswith(".init-model.tmp-") and (left / "model.pt").exists()
    (tmp_path / "model").mkdir()
    with scratch_dir(tmp_path, "scored-model") as here:  # any job clears any dead scratch
        assert here.parent == tmp_path and here.is_dir() and not left.exists()
        (here / "model.pt").write_bytes(b"w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(RuntimeError), scratch_dir(tmp_path, "init-model") as here:  # removed on failure too
        raise RuntimeError
    assert not here.exists()
