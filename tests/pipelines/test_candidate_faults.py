"""Crash safety of `recsys candidates`: SIGKILL at named points while a night's partition is written, then a
rerun publishes exactly what an uninterrupted run publishes and nothing half-written is ever visible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipelines.cli import EXIT_OK, main
from recsys.faults import FAULT_ENV
from tests.pipelines.conftest import leftovers, tiny

ROOT = Path(__file__).resolve().parents[2]
DATE = "2024-03-01"
PARTITION = f"candidates/date={DATE}"

# point → whether a previous good partition of the same date exists when the kill happens
POINTS: dict[str, bool] = {
    "candidates-scored": False,
    "candidates-parquet-written": False,
    "candidates-manifest-written": False,
    "candidates-before-publish": True,
    f"atomic-swap:date={DATE}": True,
    "candidates-published": False,
}


def _candidates(work: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", "candidates", "--quiet", "--date", DATE, *tiny(work)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _partition(work: Path) -> tuple[pl.DataFrame, bytes]:
    part = work / PARTITION
    manifest = (part / "manifest.json").read_bytes()
    return pl.read_parquet(part / "candidates.parquet"), manifest


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path):
    root = tmp_path_factory.mktemp("candidate-faults")
    base = root / "base"
    shutil.copytree(tiny_features, base / "features")
    assert main(["train", "--quiet", "--run-date", DATE, *tiny(base)]) == EXIT_OK
    reference = root / "reference"
    shutil.copytree(base, reference)
    assert main(["candidates", "--quiet", "--date", DATE, *tiny(reference)]) == EXIT_OK
    procs = {}
    for i, (point, with_previous) in enumerate(POINTS.items()):
        work = root / f"p{i}"
        shutil.copytree(reference if with_previous else base, work)
        procs[point] = (work, _candidates(work, {FAULT_ENV: point}))
    for point, (_, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err.decode()[-2000:])
    return {point: work for point, (work, _) in procs.items()}, _partition(reference)


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_candidate_write_never_shows_a_partial_partition(crashed, point: str) -> None:
    works, (ref_table, ref_manifest) = crashed
    work = works[point]
    part = work / PARTITION
    if point == f"atomic-swap:date={DATE}":
        assert not part.exists() and leftovers(work), "the kill landed between the two renames"
    elif part.exists():
        # Visible means complete: either the previous good night or the finished new one.
        table, _ = _partition(work)
        assert table.equals(ref_table)
    else:
        assert not POINTS[point]
    assert main(["candidates", "--quiet", "--date", DATE, *tiny(work)]) == EXIT_OK
    table, manifest = _partition(work)
    assert table.equals(ref_table)
    assert _same_manifest(manifest, ref_manifest)
    assert leftovers(work) == []


def _same_manifest(a: bytes, b: bytes) -> bool:
    """Manifests equal except for the sections naming the (per-test) work directory paths."""

    def strip(raw: bytes) -> dict:
        return {k: v for k, v in json.loads(raw).items() if k not in ("features", "model")}

    return strip(a) == strip(b)


def test_a_reader_after_a_writer_killed_between_the_renames_finds_the_previous_model(tmp_path, tiny_features):
    """`recsys train` killed between moving model/ aside and moving the new one in left `.model.old-…` and no
    model/: the next writer put it back, but `recsys evaluate` / `recsys candidates` run first found no model."""
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    assert main(["train", "--quiet", "--run-date", DATE, *tiny(work)]) == EXIT_OK
    before = (work / "model" / "model.pt").read_bytes()
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--quiet", "--force", "--run-date", DATE,
           *tiny(work, "train.seed=7")]
    killed = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: "atomic-swap:model"},
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not (work / "model").exists() and list(work.glob(".model.old-*")), "the kill landed between the renames"
    assert main(["candidates", "--quiet", "--date", DATE, *tiny(work)]) == EXIT_OK
    assert (work / "model" / "model.pt").read_bytes() == before  # the previous complete model, put back
    assert not list(work.glob(".model.*")) and leftovers(work) == []
