"""Learning-rate schedule and the wall-clock budget of training (train.lr_schedule, train.max_time_s)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from recsys.system import lr_factor
from recsys.training import train_model
from tests.recsys.test_system import planted_sequences, small_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_constant_schedule_warms_up_linearly_then_stays_at_one() -> None:
    f = lr_factor("constant", warmup_steps=4, total_steps=100)
    assert [f(s) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert f(99) == 1.0
    assert lr_factor("constant", 0, 10)(0) == 1.0


def test_cosine_schedule_goes_from_one_to_zero_after_warmup() -> None:
    f = lr_factor("cosine", warmup_steps=10, total_steps=110)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # half-way through the decay
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(500) == pytest.approx(0.0, abs=1e-12)  # past the end (e.g. max_epochs raised on resume)


def test_the_optimiser_follows_the_schedule(tmp_path: Path) -> None:
    seqs = planted_sequences(120, 40)
    cfg = small_config(max_epochs=2, lr_schedule="cosine", warmup_epochs=1.0)
    train_model(cfg, seqs, 40, tmp_path)
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    scheduler = state["lr_schedulers"][0]
    steps = scheduler["last_epoch"]  # LambdaLR counts optimiser steps here (interval "step")
    assert steps > 0
    per_epoch = steps // 2
    expected = cfg.train.lr * lr_factor("cosine", per_epoch, steps)(steps)
    assert scheduler["_last_lr"][0] == pytest.approx(expected, abs=1e-12)  # cosine has reached 0 at max_epochs
    assert scheduler["_last_lr"][0] < cfg.train.lr


def test_a_time_budget_stops_training_and_keeps_a_checkpoint(tmp_path: Path) -> None:
    seqs = planted_sequences(120, 40)
    result = train_model(small_config(max_epochs=1000, max_time_s=0.5), seqs, 40, tmp_path)
    assert 1 <= result.epochs_run < 1000
    assert result.best_checkpoint.is_file()
    assert len(result.history) == result.epochs_run
    assert all(row["train_s"] <= row["elapsed_s"] + 1e-9 for row in result.history)
    # fit_s: the budget's clock, which also counts the time between epochs (checkpoint writes) that elapsed_s
    # leaves out; it grows every epoch and ends within the call.
    fit_s = [row["fit_s"] for row in result.history]
    assert all(a < b for a, b in itertools.pairwise(fit_s))
    assert all(row["fit_s"] >= row["elapsed_s"] - 1e-9 for row in result.history)
    assert fit_s[-1] > result.history[-1]["elapsed_s"]  # start-up and checkpoint writes are outside the epochs
    assert fit_s[-1] <= result.wall_time_s
    assert result.train_seconds_per_epoch <= result.seconds_per_epoch


def test_the_optimiser_warms_up_then_follows_the_cosine_step_by_step() -> None:
    """The learning rate at each step of a 2-epoch run of 10 steps an epoch with 1 warm-up epoch, written out:
    (s + 1) / 11 of the rate during warm-up, then 0.5 (1 + cos(pi (s - 10) / 10)) (the final rate alone is 0
    whatever the warm-up or the step count)."""
    from types import SimpleNamespace

    from recsys.system import SASRecSystem

    cfg = small_config(max_epochs=2, lr=0.01, lr_schedule="cosine", warmup_epochs=1.0)
    system = SASRecSystem.from_config(cfg, n_items=10)
    system._trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=2)  # what the schedule reads
    config = system.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.01 * (s + 1) / 11 for s in range(10)] + \
        [0.01 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 10)) for s in range(10, 20)]
    assert seen == pytest.approx(expected, rel=1e-9)
