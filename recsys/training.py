"""Fit SASRec with Lightning: early stopping and best checkpoint on ``val/ndcg_at_10``; crash-resumable."""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import Logger

from recsys.checkpoint import LAST, AtomicCheckpointIO, ResumePoint, RunStamp, resume_point, run_identity
from recsys.config import Config
from recsys.data import SequenceDataModule, derive_seed
from recsys.faults import fault_point
from recsys.model import SASRec
from recsys.system import MONITOR, SASRecSystem

log = logging.getLogger(__name__)

STEP_STREAM = 0  # derive_seed stream of the per-step reseeding (recsys.data uses 1 for the training order)


@dataclass
class TrainResult:
    """``model`` has the best checkpoint's weights, is on CPU and in eval mode.

    ``best_epoch`` is 0-based (as in Lightning); ``seconds_per_epoch`` is the mean wall time of an epoch
    (training plus validation) over all epochs, those before a resume included; ``wall_time_s`` covers this
    call only; ``resumed_from_epoch`` is the epoch of the checkpoint training resumed from, if any.
    """

    model: SASRec
    best_checkpoint: Path
    best_val_ndcg: float
    epochs_run: int
    best_epoch: int
    wall_time_s: float
    seconds_per_epoch: float
    resumed_from_epoch: int | None = None


class _EpochTimer(Callback):
    """Wall time per epoch; stateful, so the durations survive a resume."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # In Lightning 2.x this hook runs after the epoch's validation loop (and before checkpointing).
        self.durations.append(time.perf_counter() - self._start)

    def state_dict(self) -> dict[str, Any]:
        return {"durations": list(self.durations)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.durations = list(state_dict["durations"])


class _StepSeed(Callback):
    """Reseeds torch, numpy and random before every training step from (seed, epoch, batch) alone.

    Lightning does not restore the global RNG on resume, and what draws from it between steps (a new
    DataLoader iterator draws a base seed) differs between a fresh and a resumed epoch; with this a resumed
    run draws the same dropout masks and negatives as an uninterrupted one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed = derive_seed(self.seed, STEP_STREAM, trainer.current_epoch, batch_idx)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


class _FaultPoints(Callback):
    """The training-loop points of :mod:`recsys.faults` (a test hook; no-ops unless RECSYS_FAULT is set)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fault_point(f"epoch-start-e{trainer.current_epoch}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fault_point(f"train-batch-e{trainer.current_epoch}b{batch_idx}")


def resolve_hardware(accelerator: str, precision: str) -> tuple[str, str]:
    """Map ``"auto"`` settings to concrete ones: GPU and bf16-mixed when CUDA is present, else CPU and 32-true.

    Raises ``ValueError`` if ``"gpu"`` is asked for without CUDA.
    """
    has_cuda = torch.cuda.is_available()
    if accelerator == "gpu" and not has_cuda:
        raise ValueError("train.accelerator is 'gpu' but CUDA is not available; use 'auto' or 'cpu'")
    accelerator = ("gpu" if has_cuda else "cpu") if accelerator == "auto" else accelerator
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return accelerator, precision


def train_model(
    cfg: Config, sequences: pl.DataFrame, n_items: int, checkpoint_dir: Path, logger: Logger | None = None
) -> TrainResult:
    """Train on ``sequences`` (the SEQUENCES contract), checkpointing into ``checkpoint_dir``.

    Checkpoints: ``best-epochNNN.ckpt`` (best val NDCG@10) and ``last.ckpt`` (end of the latest epoch), each
    written atomically and stamped with :func:`recsys.checkpoint.run_identity`. If ``last.ckpt`` is there and
    carries this run's identity, training resumes from it (and returns at once if the run had finished);
    otherwise the directory's checkpoints are removed and training starts afresh. Every step's randomness
    (order, dropout, negatives) depends only on (``cfg.train.seed``, epoch, batch), so on CPU a resumed run
    ends with the same weights as an uninterrupted one (the global deterministic-algorithms flag is restored
    afterwards); on GPU, float32 matmuls may use TF32. ``logger`` None means no logging at all.
    Raises ``ValueError`` if no user can be trained on or no user has val items.
    """
    L.seed_everything(cfg.train.seed, workers=True)
    t = cfg.train
    data = SequenceDataModule(sequences, n_items, cfg.model.max_len, t.batch_size, t.val_batch_size, t.seed)
    if len(data.train_users) == 0 or len(data.val_users) == 0:
        raise ValueError(
            f"sequences: {len(data.train_users)} users with >= 2 train_items and {len(data.val_users)} with "
            "val_items; training needs both to be non-empty"
        )
    system = SASRecSystem.from_config(cfg, n_items)
    checkpoint_dir = Path(checkpoint_dir)
    identity = run_identity(cfg, sequences, n_items)
    resume = resume_point(checkpoint_dir, identity)
    best, timer = _best_checkpoint(checkpoint_dir), _EpochTimer()
    callbacks = [
        EarlyStopping(monitor=MONITOR, mode="max", patience=t.patience), best,
        _last_checkpoint(checkpoint_dir), timer, _StepSeed(t.seed), RunStamp(identity), _FaultPoints(),
    ]
    n_batches = math.ceil(len(data.train_users) / t.batch_size)
    trainer = _trainer(cfg, checkpoint_dir, callbacks, logger, n_batches)
    if resume is not None:
        log.info("resuming from %s (end of epoch %d)", resume.path, resume.epoch)
    start = time.perf_counter()
    _fit(trainer, system, data, resume)
    wall = time.perf_counter() - start
    if not best.best_model_path:
        raise RuntimeError(f"training stopped before any checkpoint was written to {best.dirpath}")
    best_path = Path(best.best_model_path)
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    system.load_state_dict(state["state_dict"])
    return TrainResult(
        model=system.model.cpu().eval(),
        best_checkpoint=best_path,
        best_val_ndcg=float(best.best_model_score),
        epochs_run=len(timer.durations),
        best_epoch=int(state["epoch"]),
        wall_time_s=wall,
        seconds_per_epoch=sum(timer.durations) / max(len(timer.durations), 1),
        resumed_from_epoch=None if resume is None else resume.epoch,
    )


def _fit(
    trainer: L.Trainer, system: SASRecSystem, data: SequenceDataModule, resume: ResumePoint | None
) -> None:
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings():
            # Batches are slices of in-memory tensors; worker processes would only add overhead.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # Resuming into the directory the checkpoints came from is the point.
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            # weights_only=True: a resumed checkpoint is never unpickled as arbitrary objects.
            trainer.fit(system, datamodule=data, ckpt_path=None if resume is None else resume.path,
                        weights_only=True)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _best_checkpoint(ckpt_dir: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
        monitor=MONITOR, mode="max", save_top_k=1,
    )


def _last_checkpoint(ckpt_dir: Path) -> ModelCheckpoint:
    # Not ``save_last=True`` on the best callback: that writes last.ckpt only in epochs where the best one
    # improved, so a resumed run would redo up to ``patience`` epochs. It must come after the best callback,
    # so that last.ckpt holds the best callback's state of the same epoch.
    return ModelCheckpoint(
        dirpath=ckpt_dir, filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False,
    )


def _trainer(
    cfg: Config, out_dir: Path, callbacks: list[Callback], logger: Logger | None, n_batches: int
) -> L.Trainer:
    accelerator, precision = resolve_hardware(cfg.train.accelerator, cfg.train.precision)
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")
    return L.Trainer(
        max_epochs=cfg.train.max_epochs,
        accelerator=accelerator,
        devices=cfg.train.devices,
        precision=precision,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        enable_progress_bar=cfg.train.progress,
        enable_model_summary=False,
        deterministic=accelerator == "cpu",
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out_dir,
        log_every_n_steps=min(50, n_batches),
    )
