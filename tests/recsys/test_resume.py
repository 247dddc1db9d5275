"""train_model resumes only its own run's checkpoint, and a finished (early-stopped) run stays finished.

The SIGKILL tests of the whole `recsys train` job are in tests/pipelines/test_faults.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from recsys.checkpoint import IDENTITY_KEY, run_identity
from recsys.training import seed_step_generators, train_model
from tests.recsys.test_system import planted_sequences, small_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.usefixtures("one_thread")]


def test_an_early_stopped_run_is_not_trained_further_on_resume(tmp_path: Path) -> None:
    # An lr far below float32 resolution leaves the weights, hence val NDCG, unchanged: stops after epoch 1.
    seqs, cfg = planted_sequences(120, 40), small_config(max_epochs=6, patience=1, lr=1e-30)
    first = train_model(cfg, seqs, 40, tmp_path)
    assert first.epochs_run == 2 and first.resumed_from_epoch is None
    again = train_model(cfg, seqs, 40, tmp_path)  # as after a crash between training and the marker
    assert again.resumed_from_epoch == 1 and again.epochs_run == 2
    assert again.best_checkpoint == first.best_checkpoint
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, caplog) -> None:
    seqs = planted_sequences(120, 40)
    train_model(small_config(max_epochs=1, seed=1), seqs, 40, tmp_path)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)[IDENTITY_KEY]
    with caplog.at_level(logging.WARNING, logger="recsys.checkpoint"):
        other = train_model(small_config(max_epochs=1, seed=2), seqs, 40, tmp_path)
    assert other.resumed_from_epoch is None
    assert "written by another run" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]


def test_the_time_budget_is_not_part_of_the_run_identity(tmp_path: Path) -> None:
    seqs = planted_sequences(120, 40)
    base = run_identity(small_config(max_epochs=2), seqs, 40)
    assert run_identity(small_config(max_epochs=2, max_time_s=5.0), seqs, 40) == base
    assert run_identity(small_config(max_epochs=2, lr=2e-3), seqs, 40) != base
    first = train_model(small_config(max_epochs=2), seqs, 40, tmp_path)
    # Continued under a budget: resumes the same run (finished, so nothing more is trained).
    again = train_model(small_config(max_epochs=2, max_time_s=3600.0), seqs, 40, tmp_path)
    assert again.resumed_from_epoch == 1 and again.epochs_run == 2
    assert again.best_checkpoint == first.best_checkpoint


def test_step_seeding_draws_what_torch_manual_seed_draws() -> None:
    """The step's reseed touches only the generators the step uses, and they draw as after torch.manual_seed."""
    torch.manual_seed(123)
    expected = (torch.rand(5), torch.randint(0, 1000, (5,)))
    torch.manual_seed(999)  # another state in between
    seed_step_generators(123, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected[0])
    assert torch.equal(torch.randint(0, 1000, (5,)), expected[1])
