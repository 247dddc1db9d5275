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


def test_validation_during_training_scores_the_users_evaluation_scores(tmp_path: Path) -> None:
    """A time split can give a user validation events but no training history (all events after the cutoff):
    evaluation leaves such users out, so the validation metric that picks the checkpoint must too."""
    import polars as pl

    from recsys.data import SequenceDataModule

    seqs = planted_sequences(200, N_ITEMS)
    cold = seqs["user_idx"].head(20)
    seqs = seqs.with_columns(  # 20 users with their history moved away: validation targets only
        pl.when(pl.col("user_idx").is_in(cold.implode())).then(pl.lit([], dtype=pl.List(pl.Int32)))
        .otherwise(pl.col("train_items")).alias("train_items"))
    data = SequenceDataModule(seqs, N_ITEMS, 10)
    val = build_eval_set(seqs, "val", 10)
    assert sorted(data.val_users.tolist()) == sorted(val.user_idx.tolist())
    assert not set(cold.to_list()) & set(data.val_users.tolist())
    cfg = small_config(max_epochs=2)
    run = train_model(cfg, seqs, N_ITEMS, tmp_path / "run")
    recomputed = evaluate_scorer(model_scorer(run.model), build_eval_set(seqs, "val", cfg.model.max_len),
                                 N_ITEMS, ks=(10,))["ndcg_at_10"]
    assert recomputed == pytest.approx(run.best_val_ndcg, abs=1e-5)
