"""Tiny work directories for the scheduling and crash tests: features built once, copied per test."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipelines.cli import EXIT_OK, main

# Small enough that 4 epochs take about a second on one CPU thread; 200 users → 2 batches per epoch.
TINY = [
    "data.source=synthetic", "data.synthetic.n_users=200", "data.synthetic.n_items=50",
    "model.max_len=20", "model.hidden=16", "model.n_blocks=1", "train.max_epochs=4", "train.progress=false",
    "tracking.enabled=false", "candidates.k=5", "candidates.recall_sample=20",
]


def tiny(work: Path, *extra: str) -> list[str]:
    """Overrides for a tiny run in ``work``."""
    return [f"work_dir={work}", *TINY, *extra]


def train_tiny(work: Path, features: Path) -> Path:
    """``work`` with a copy of the tiny ``features`` and a model trained on them (``recsys train``)."""
    shutil.copytree(features, work / "features")
    assert main(["train", "--quiet", *tiny(work)]) == EXIT_OK
    return work


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("features") / "work"
    assert main(["features", "--quiet", *tiny(work)]) == EXIT_OK
    return work / "features"


@pytest.fixture
def new_work(tiny_features: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A fresh work directory (under tmp_path, named ``name``) holding a copy of the tiny features."""

    def make(name: str = "work") -> Path:
        work = tmp_path / name
        shutil.copytree(tiny_features, work / "features")
        return work

    return make


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Same thread count as the `OMP_NUM_THREADS=1` subprocesses, so weights compare bit for bit.

    Package scope: it must already hold when module-scoped fixtures train their reference runs (a
    function-scoped fixture would only start after them, and a 2-thread reference differs in the last bits).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weights(work: Path) -> dict[str, torch.Tensor]:
    return torch.load(work / "model" / "model.pt", map_location="cpu", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(work: Path) -> list[Path]:
    """Temporary (``.tmp-``) or displaced (``.old-``) files and directories anywhere under ``work``."""
    return [p for p in work.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
