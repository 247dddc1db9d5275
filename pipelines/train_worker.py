"""Training on a DDP process other than global rank 0: it trains its share of every batch and writes nothing.

Rank 0 runs the ordinary train job (lock, checkpoints, model directory, MLflow run, marker); the others run
this, started by Lightning's launcher (which re-runs the command line with ``LOCAL_RANK`` set), by torchrun
or by SLURM. See README "Scale-out".
"""

from __future__ import annotations

import datetime as dt
import logging

from features.artifacts import load_features
from pipelines.schedule import checkpoint_dir
from pipelines.train import loss_type_weights, model_attributes, model_event_types
from pipelines.workdir import WorkDir
from recsys.config import Config
from recsys.training import train_model

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date, allow_resume: bool = True) -> None:
    """Join the DDP run of ``run_date`` (the same features and checkpoint directory as rank 0)."""
    feats = load_features(WorkDir.of(cfg).features)
    result = train_model(cfg, feats.sequences, feats.n_items, checkpoint_dir(cfg, run_date),
                         allow_resume=allow_resume, attributes=model_attributes(cfg, feats),
                         n_event_types=model_event_types(cfg, feats), type_weights=loss_type_weights(cfg, feats))
    log.info("train worker: done (best val NDCG@10 %.4f at epoch %d; rank 0 writes the model)",
             result.best_val_ndcg, result.best_epoch + 1)
