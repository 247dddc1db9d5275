"""SIGTERM to rank 0 of a 2-process CPU (gloo) `recsys train`: every process stops, rank 0 exits 143, and the
same command then resumes from the last checkpoint, as with one process.

Rank 0 sends itself the signal at a chosen point (``STOP_ENV``), as a scheduler signals the process it
started; the test does not signal the other one (Lightning's own handler forwards the signal to it,
recsys.signals does not). At these points Lightning 2.6's own handler, which broadcasts inside the handler,
hung both processes every time without recsys.signals: rank 0 pauses before signalling itself, so rank 1
already waits in its next collective (the gradient all-reduce, the validation's reductions, the checkpoint's
broadcast) when rank 0's broadcast pairs with it. With a signal at a random moment the hang is a race (2 in 8 runs in review), or a rank dies with
gloo's "Connection closed by peer" (exit 1).

To signal at a point this module is also the command: ``python -m tests.recsys.test_ddp_sigterm train ...``
runs ``pipelines.cli`` with a hook on one method of the Lightning system, and Lightning's launcher re-runs
the same command line for rank 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.cli import EXIT_OK, EXIT_TERMINATED, main
from recsys.storage import read_json

ROOT = Path(__file__).resolve().parents[2]
RUN_DATE = "2024-06-01"
STOP_ENV = "RECSYS_TEST_STOP_AT"  # "<SASRecSystem method>:<epoch>": rank 0 SIGTERMs itself on entering it
LAG_S = 1.5  # rank 0 pauses this long before signalling itself (sleeping: no CPU)
TIMEOUT_S = 60  # wall clock of one run; a stopped run takes 12-14 s on a busy 2-core machine

# 64 users, 2 global training and validation batches per epoch (each rank takes half of each), 3 epochs.
SETTINGS = [
    "data.source=synthetic", "data.synthetic.n_users=64", "data.synthetic.n_items=40",
    "data.synthetic.min_len=14", "data.synthetic.max_len=20", "model.max_len=8", "model.hidden=16",
    "model.n_blocks=1", "train.max_epochs=3", "train.batch_size=32", "train.val_batch_size=32",
    "train.accelerator=cpu", "train.progress=false", "tracking.enabled=false",
]

# Where rank 0 is signalled, in run order on one work directory, and the epoch whose last.ckpt is then the
# resume point (each run resumes from the previous one's).
STOPS: list[tuple[str, int]] = [
    # in epoch 1's first training step, before its backward: rank 1 waits in the gradient all-reduce
    ("training_step:1", 0),
    # in epoch 2's first validation batch of two: before the validation's reductions
    ("validation_step:2", 1),
    # after the last validation, before the last checkpoints (a collective save): it stops at the end of
    # training with the last checkpoint written, so the rerun resumes as finished
    ("on_train_epoch_end:2", 2),
]


def _with_stop_hook() -> None:
    """Make rank 0 SIGTERM itself on entering the ``STOP_ENV`` method of the Lightning system at that epoch."""
    from recsys.system import SASRecSystem

    name, epoch = os.environ[STOP_ENV].split(":")
    original = getattr(SASRecSystem, name)

    def hooked(self: SASRecSystem, *args: Any, **kwargs: Any) -> Any:
        if self.global_rank == 0 and self.current_epoch == int(epoch) and not self.trainer.sanity_checking:
            time.sleep(LAG_S)  # rank 1 goes on to its next collective and waits there for rank 0
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    setattr(SASRecSystem, name, hooked)


def _train(work: Path, stop_at: str | None, expected: int) -> None:
    """Run the 2-process ``recsys train`` (rank 0 stopped at ``stop_at``); rank 0 must exit with ``expected``
    within ``TIMEOUT_S`` and rank 1 soon after. Both run in a new session, so that a hung run is ended as one
    process group (and the test fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stop_at is not None:
        env[STOP_ENV] = stop_at
    cmd = [sys.executable, "-m", "tests.recsys.test_ddp_sigterm", "train", "--quiet", "--run-date", RUN_DATE,
           f"work_dir={work}", *SETTINGS, "train.devices=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"stop at {stop_at}: still running {TIMEOUT_S} s later (the ranks hang); killed")
    _wait_for_group_exit(proc.pid, stop_at)
    assert proc.returncode == expected, (stop_at, proc.returncode, err.decode()[-3000:])


def _wait_for_group_exit(pgid: int, stop_at: str | None, timeout_s: float = 20.0) -> None:
    """Rank 1 (rank 0's child, in its process group) must end too; SIGKILL the group and fail if it does not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    pytest.fail(f"stop at {stop_at}: rank 1 still running {timeout_s} s after rank 0 exited; killed")


def _resume_epoch(work: Path) -> int:
    (last,) = work.glob("**/last.ckpt")
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])


def test_sigterm_to_rank_0_stops_both_ranks_with_143_and_the_rerun_resumes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert main(["features", "--quiet", f"work_dir={work}", *SETTINGS]) == EXIT_OK
    for stop_at, resume_epoch in STOPS:
        _train(work, stop_at, EXIT_TERMINATED)
        assert _resume_epoch(work) == resume_epoch, stop_at
        logs = sorted((work / "logs").glob("train-*.log"), key=lambda p: p.stat().st_mtime)
        worker = [p for p in logs if p.name.startswith("train-worker-")][-1]
        assert "stopped by SIGTERM" in worker.read_text(), f"stop at {stop_at}: rank 1 did not stop on it"
        assert not (work / "runs").exists() and not (work / "model").exists()  # nothing marked done
    _train(work, None, EXIT_OK)
    report = read_json(work / "model" / "train_report.json")
    assert report["resumed_from_epoch"] == STOPS[-1][1]
    assert len(report["history"]) == 3


class _Strategy:
    def __init__(self) -> None:
        self.calls = 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 (Lightning's name)
        self.calls += 1
        return decision


class _Trainer:
    world_size, num_training_batches, current_epoch, sanity_checking = 2, 21, 0, False

    def __init__(self) -> None:
        self.strategy = _Strategy()


def test_training_batches_agree_every_n_batches_and_at_the_epochs_last() -> None:
    """The flags are all-reduced after every 8th batch and the epoch's last (each check waits for the GPU),
    and the first check after the signal stops the run."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from recsys.signals import SynchronizedSigterm

    trainer, stop = _Trainer(), SynchronizedSigterm(every_n_batches=8)
    stop.setup(trainer, None, "fit")
    checked = []
    for batch_idx in range(trainer.num_training_batches):
        before = trainer.strategy.calls
        stop.on_train_batch_end(trainer, None, None, None, batch_idx)
        if trainer.strategy.calls > before:
            checked.append(batch_idx)
    assert checked == [7, 15, 20]
    stop._on_sigterm(signal.SIGTERM, None)
    stop.on_train_batch_end(trainer, None, None, None, 8)  # not a check point: goes on
    with pytest.raises(SIGTERMException):
        stop.on_train_batch_end(trainer, None, None, None, 15)
    with pytest.raises(ValueError, match="every_n_batches"):
        SynchronizedSigterm(every_n_batches=0)


if __name__ == "__main__":
    if os.environ.get(STOP_ENV):
        _with_stop_hook()
    sys.exit(main(sys.argv[1:]))
