"""train.ema_decay: the returned model, its validation score and its checkpoint are the averaged weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.evaluation import build_eval_set, evaluate_scorer, model_scorer
from recsys.training import train_model
from tests.recsys.test_system import planted_sequences, small_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.usefixtures("one_thread")]

N_ITEMS = 40


def test_a_decay_near_zero_gives_the_plain_run(tmp_path: Path) -> None:
    seqs = planted_sequences(200, N_ITEMS)
    plain = train_model(small_config(max_epochs=2), seqs, N_ITEMS, tmp_path / "plain")
    ema = train_model(small_config(max_epochs=2, ema_decay=1e-9), seqs, N_ITEMS, tmp_path / "ema")
    a, b = plain.model.state_dict(), ema.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_averaged_weights_are_what_validation_scored_and_what_is_returned(tmp_path: Path) -> None:
    seqs = planted_sequences(200, N_ITEMS)
    cfg = small_config(max_epochs=3, ema_decay=0.9)
    plain = train_model(small_config(max_epochs=3), seqs, N_ITEMS, tmp_path / "plain")
    ema = train_model(cfg, seqs, N_ITEMS, tmp_path / "ema")
    a, b = plain.model.state_dict(), ema.model.state_dict()
    assert any(not torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # averaging changed the weights
    # The validation NDCG@10 that chose the checkpoint is the returned (averaged) model's own.
    val = build_eval_set(seqs, "val", cfg.model.max_len)
    recomputed = evaluate_scorer(model_scorer(ema.model), val, N_ITEMS, ks=(10,))["ndcg_at_10"]
    assert recomputed == pytest.approx(ema.best_val_ndcg, abs=1e-5)
    ckpt = torch.load(ema.best_checkpoint, map_location="cpu", weights_only=True)
    assert "current_model_state" in ckpt  # the raw weights are kept for resuming
    assert all(torch.equal(ckpt["state_dict"][f"model.{k}"], v) for k, v in b.items())
