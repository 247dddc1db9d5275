"""Crash safety of `recsys train`: SIGKILL at named points, then a rerun resumes and ends with the weights
of an uninterrupted run, leaving nothing temporary behind.

The kills use the test hook of ``recsys/faults.py`` (``RECSYS_FAULT=<point>``) in real
``python -m pipelines.cli train`` processes, all started at once (each one pays for importing torch and
Lightning); the reruns run in this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import EXIT_OK, EXIT_TERMINATED, main
from recsys.faults import FAULT_ENV, SIGNAL_ENV
from recsys.storage import read_json
from tests.pipelines.conftest import leftovers, same_weights, tiny, weights

RUN_DATE = "2024-03-01"
ROOT = Path(__file__).resolve().parents[2]

# point → the epoch whose checkpoint a rerun resumes from (None: nothing was checkpointed yet)
POINTS: dict[str, int | None] = {
    "train-batch-e0b0": None,  # during the first epoch
    "train-batch-e2b1": 1,  # mid-way: in the middle of epoch 2, after epoch 1's checkpoint
    "checkpoint-write-e3": 2,  # while a checkpoint file of the last epoch is being written
    "model-write": 3,  # inside the model directory's temporary copy
    "before-marker": 3,  # model directory complete, success marker not yet written
}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> tuple[dict[str, Path], dict]:
    """One work directory per fault point, each with a `recsys train` SIGKILLed at that point; and the
    weights of an uninterrupted run with the same seed (trained here while those processes start up)."""
    root = tmp_path_factory.mktemp("faults")
    procs = {point: _start_killed_train(root / point, tiny_features, point) for point in POINTS}
    reference = root / "reference"
    shutil.copytree(tiny_features, reference / "features")
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(reference)]) == EXIT_OK
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err.decode()[-2000:])
    return {point: root / point for point in POINTS}, weights(reference)


def _start_killed_train(work: Path, features: Path, point: str) -> subprocess.Popen:
    shutil.copytree(features, work / "features")
    env = {**os.environ, FAULT_ENV: point, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--quiet", "--run-date", RUN_DATE, *tiny(work)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _evidence(work: Path, point: str) -> None:
    """What the kill left, so that each point is known to have been reached where it claims."""
    ckpts = [p for p in (work / "checkpoints").rglob("*") if p.is_file()]
    if point == "train-batch-e0b0":
        assert ckpts == []
    if point == "checkpoint-write-e3":
        assert any(".tmp-" in p.name for p in ckpts), ckpts
    if point == "model-write":
        assert any(p.name.startswith(".model.tmp-") for p in work.iterdir())
    if point in ("model-write", "before-marker"):
        assert not (work / "runs").exists()
    if point == "before-marker":
        assert (work / "model" / "model.pt").is_file()


@pytest.mark.parametrize("point", list(POINTS))
def test_rerun_after_sigkill_resumes_to_the_same_weights(crashed, point: str) -> None:
    works, reference = crashed
    work = works[point]
    _evidence(work, point)
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(work)]) == EXIT_OK
    report = read_json(work / "model" / "train_report.json")
    assert report["resumed_from_epoch"] == POINTS[point]
    assert report["epochs_run"] == 4
    assert same_weights(weights(work), reference)
    assert leftovers(work) == []
    assert (work / "runs" / "train" / f"{RUN_DATE}.json").is_file()
    # the best checkpoint and the finished run's last.ckpt (for a rerun of the date with another candidates key)
    assert sorted(p.name for p in (work / "checkpoints").rglob("*.ckpt")) == sorted(
        [Path(report["checkpoint"]).name, "last.ckpt"])


def test_rerun_after_sigkill_with_weight_averaging_resumes_to_the_same_weights(
    tmp_path: Path, tiny_features: Path
) -> None:
    """train.ema_decay: the averaged weights and the raw ones both come back from the checkpoint."""
    ema = ("train.ema_decay=0.9",)
    killed = tmp_path / "killed"
    shutil.copytree(tiny_features, killed / "features")
    env = {**os.environ, FAULT_ENV: "train-batch-e2b1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--quiet", "--run-date", RUN_DATE, *tiny(killed, *ema)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    reference = tmp_path / "reference"
    shutil.copytree(tiny_features, reference / "features")
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(reference, *ema)]) == EXIT_OK
    plain = tmp_path / "plain"
    shutil.copytree(tiny_features, plain / "features")
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(plain)]) == EXIT_OK
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(killed, *ema)]) == EXIT_OK
    assert read_json(killed / "model" / "train_report.json")["resumed_from_epoch"] == 1
    assert same_weights(weights(killed), weights(reference))
    assert not same_weights(weights(plain), weights(reference))  # the averaging is in the weights compared


def test_sigterm_during_training_exits_143_marks_nothing_done_and_a_rerun_resumes(
    tmp_path: Path, tiny_features: Path
) -> None:
    """What a scheduler sends to stop a job: Lightning turns it into a SystemExit whose status would be 0."""
    import mlflow
    from mlflow import MlflowClient

    stopped = tmp_path / "stopped"
    shutil.copytree(tiny_features, stopped / "features")
    track = ("tracking.enabled=true",)
    env = {**os.environ, FAULT_ENV: "train-batch-e2b0", SIGNAL_ENV: "TERM", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--quiet", "--run-date", RUN_DATE, *tiny(stopped, *track)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == EXIT_TERMINATED == 143, (proc.returncode, proc.stderr.decode()[-2000:])
    log = next((stopped / "logs").glob("train-*.log")).read_text()
    assert "stopped by SIGTERM before it finished" in log
    assert not (stopped / "runs").exists()
    assert not (stopped / "model").exists()
    assert leftovers(stopped) == []
    client = MlflowClient(tracking_uri=f"sqlite:///{stopped / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    mlflow.set_tracking_uri(None)

    reference = tmp_path / "reference"
    shutil.copytree(tiny_features, reference / "features")
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(reference)]) == EXIT_OK
    # The rerun may carry a time budget: train.max_time_s is not part of the run's identity.
    budget = ("train.max_time_s=3600",)
    assert main(["train", "--quiet", "--run-date", RUN_DATE, *tiny(stopped, *track, *budget)]) == EXIT_OK
    mlflow.set_tracking_uri(None)
    assert read_json(stopped / "model" / "train_report.json")["resumed_from_epoch"] == 1
    assert same_weights(weights(stopped), weights(reference))
    assert (stopped / "runs" / "train" / f"{RUN_DATE}.json").is_file()
