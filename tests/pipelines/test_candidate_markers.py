"""Night completion markers of `recsys candidates` around a rerun and retention: a marker never describes lists
that are not published, whatever point the job is killed at, and retention never fails a published night."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

import pipelines.generate_candidates as job
from pipelines.cli import EXIT_OK, main
from tests.pipelines.conftest import leftovers, tiny, train_tiny


class Killed(BaseException):
    """Stands for a SIGKILL at a point of the job: nothing after it runs (not caught by the CLI)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    return train_tiny(tmp_path_factory.mktemp("candidate-markers") / "work", tiny_features)


def _work(trained: Path, tmp_path: Path, *nights: str) -> Path:
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    for day in nights:
        assert main(["candidates", "--quiet", "--date", day, *tiny(work)]) == EXIT_OK
    return work


def _markers(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "candidates" / "complete").glob("date=*.json"))


def test_a_rerun_killed_after_publishing_leaves_no_marker_of_the_old_lists(trained, tmp_path, monkeypatch) -> None:
    """Rerun of a complete night (other lists: candidates.k=3) killed right after the swap, before the marker is
    rewritten: the night is unmarked (not complete) rather than marked with the replaced lists' rows and sha."""
    work = _work(trained, tmp_path, "2024-08-01")
    marker = work / "candidates" / "complete" / "date=2024-08-01.json"
    assert json.loads(marker.read_text())["rows"] > 0

    def kill_after_publish(name: str) -> None:
        if name == "candidates-published":
            raise Killed(name)

    monkeypatch.setattr(job, "fault_point", kill_after_publish)
    with pytest.raises(Killed):
        main(["candidates", "--quiet", "--date", "2024-08-01", *tiny(work, "candidates.k=3")])
    part = work / "candidates" / "date=2024-08-01"
    assert pl.read_parquet(part / "candidates.parquet").height == json.loads((part / "manifest.json").read_text())[
        "rows"]  # the new lists are published
    assert not marker.exists()
    monkeypatch.undo()
    assert main(["candidates", "--quiet", "--date", "2024-08-01", *tiny(work, "candidates.k=3")]) == EXIT_OK
    assert json.loads(marker.read_text())["rows"] == pl.read_parquet(part / "candidates.parquet").height


@pytest.mark.parametrize("fails", ["flush", "swap"])
def test_a_rerun_whose_publish_fails_leaves_the_night_marked_as_before(trained, tmp_path, monkeypatch, fails) -> None:
    """Rerun of a complete night (other lists) whose publish fails with an I/O error after the marker was
    removed: flushing the new partition, or renaming it into place (the old one already moved aside). The old
    lists are back in place, and so is their marker, byte for byte; the job fails (exit 1)."""
    import recsys.storage as storage

    work = _work(trained, tmp_path, "2024-08-01")
    marker = work / "candidates" / "complete" / "date=2024-08-01.json"
    part = work / "candidates" / "date=2024-08-01"
    before, lists = marker.read_bytes(), (part / "candidates.parquet").read_bytes()
    if fails == "flush":
        def broken_fsync(path: Path) -> None:
            raise OSError(5, "Input/output error", str(path))

        monkeypatch.setattr(storage, "_fsync_tree", broken_fsync)
    else:
        replace = storage.os.replace

        def broken_rename(src, dst) -> None:
            if storage.TMP_TAG in Path(src).name and Path(dst) == part:
                raise OSError(5, "Input/output error", str(src))
            replace(src, dst)

        monkeypatch.setattr(storage.os, "replace", broken_rename)
    assert main(["candidates", "--quiet", "--date", "2024-08-01", *tiny(work, "candidates.k=3")]) == 1
    monkeypatch.undo()
    assert (part / "candidates.parquet").read_bytes() == lists  # the old lists, still published
    assert marker.read_bytes() == before
    assert not leftovers(work / "candidates")


def test_retention_removes_a_nights_marker_before_its_partition(trained, tmp_path, monkeypatch) -> None:
    """Killed while removing expired partitions: their markers are gone already, none outlives its night."""
    work = _work(trained, tmp_path, "2024-08-01", "2024-08-02")

    def remove_then_die(path: Path) -> None:
        raise Killed(str(path))

    monkeypatch.setattr(job, "remove_dir", remove_then_die)
    with pytest.raises(Killed):
        main(["candidates", "--quiet", "--date", "2024-08-05", *tiny(work, "candidates.keep_days=2")])
    assert _markers(work) == ["date=2024-08-05.json"]


def test_retention_sweeps_the_marker_of_a_night_whose_partition_is_gone(trained, tmp_path) -> None:
    """A marker left by a run killed between the partition and the marker (earlier versions removed them in that
    order), or a partition removed by hand: the next retention removes the orphan marker; a kept night's stays."""
    work = _work(trained, tmp_path, "2024-08-01", "2024-08-02", "2024-08-04")
    shutil.rmtree(work / "candidates" / "date=2024-08-01")
    assert main(["candidates", "--quiet", "--date", "2024-08-05", *tiny(work, "candidates.keep_days=3")]) == EXIT_OK
    assert _markers(work) == ["date=2024-08-04.json", "date=2024-08-05.json"]
    retention = json.loads((work / "candidates" / "date=2024-08-05" / "retention.json").read_text())
    assert retention["removed"] == ["date=2024-08-02", "complete/date=2024-08-01.json",
                                                "complete/date=2024-08-02.json"]


def test_a_partition_that_cannot_be_removed_does_not_fail_a_published_night(trained, tmp_path, monkeypatch,
                                                                             capsys) -> None:
    """NFS: a reader holding a file of an expired partition open makes its removal fail; tonight is published
    and marked already, so the job succeeds, names the path in a warning, and the next night retries."""
    work = _work(trained, tmp_path, "2024-08-01", "2024-08-02")
    real = job.remove_dir

    def busy(path: Path) -> None:
        if path.name == "date=2024-08-01":
            raise OSError(16, "Device or resource busy", str(path))
        real(path)

    monkeypatch.setattr(job, "remove_dir", busy)
    capsys.readouterr()
    assert main(["candidates", "--quiet", "--date", "2024-08-05", *tiny(work, "candidates.keep_days=2")]) == EXIT_OK
    stuck = work / "candidates" / "date=2024-08-01"
    assert f"WARNING pipelines.generate_candidates: candidates: retention could not remove {stuck}" in \
        capsys.readouterr().err
    assert sorted(p.name for p in (work / "candidates").glob("date=*")) == ["date=2024-08-01", "date=2024-08-05"]
    assert _markers(work) == ["date=2024-08-05.json"]
    monkeypatch.undo()
    assert main(["candidates", "--quiet", "--date", "2024-08-06", *tiny(work, "candidates.keep_days=2")]) == EXIT_OK
    assert sorted(p.name for p in (work / "candidates").glob("date=*")) == ["date=2024-08-05", "date=2024-08-06"]
    assert leftovers(work) == []


def test_nights_of_a_release_before_markers_are_not_reported_incomplete(trained, tmp_path, capsys) -> None:
    """After an upgrade, before its first night: no night of the directory has a marker (the older release wrote
    none), and status called the latest published night NOT complete, its gauge 0 (a false alert). A shard
    missing is still missing; once this release marks nights, an unmarked one is incomplete again."""
    work = _work(trained, tmp_path, "2024-05-01")
    shutil.rmtree(work / "candidates" / "complete")  # as an older release left it: no marker, and a manifest
    manifest = work / "candidates" / "date=2024-05-01" / "manifest.json"  # without the weights' SHA-256
    fields = json.loads(manifest.read_text())
    del fields["model"]["weights_sha256"]
    manifest.write_text(json.dumps(fields))
    prom = tmp_path / "status.prom"
    assert main(["status", "--prometheus", str(prom), *tiny(work)]) == EXIT_OK
    assert "complete (every part published; written before completion markers" in capsys.readouterr().out
    assert re.search(r"^recsys_candidates_latest_complete\{[^}]*\} 1\.0$", prom.read_text(), re.M)
    assert main(["candidates", "--quiet", "--date", "2024-05-02", *tiny(work)]) == EXIT_OK
    (work / "candidates" / "complete" / "date=2024-05-02.json").unlink()  # this release's night, unmarked
    shutil.rmtree(work / "candidates" / "complete")  # (no marker anywhere: still this release's manifest)
    capsys.readouterr()
    assert main(["status", *tiny(work)]) == EXIT_OK
    assert "NOT complete (completion marker missing" in capsys.readouterr().out
