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
