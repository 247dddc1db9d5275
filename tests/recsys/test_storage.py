"""Atomic writes and the clean-up of what a killed writer leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recsys.storage import atomic_dir, atomic_write_bytes, remove_stale_temps


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


def test_a_writer_names_its_temporaries_with_its_pid_and_host(tmp_path: Path) -> None:
    import os
    import socket

    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name == f".out.tmp-{os.getpid()}@{socket.gethostname()}"
