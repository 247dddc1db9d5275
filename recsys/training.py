"""Fit SASRec with Lightning: early stopping and best-checkpoint selection on ``val/ndcg_at_10``."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import Logger

from recsys.config import Config
from recsys.data import SequenceDataModule
from recsys.model import SASRec
from recsys.system import MONITOR, SASRecSystem


@dataclass
class TrainResult:
    """``model`` has the best checkpoint's weights, is on CPU and in eval mode.

    ``best_epoch`` is 0-based (as in Lightning); ``seconds_per_epoch`` is the mean wall time of an epoch
    (training plus validation).
    """

    model: SASRec
    best_checkpoint: Path
    best_val_ndcg: float
    epochs_run: int
    best_epoch: int
    wall_time_s: float
    seconds_per_epoch: float


class _EpochTimer(Callback):
    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # In Lightning 2.x this hook runs after the epoch's validation loop.
        self.durations.append(time.perf_counter() - self._start)


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
    cfg: Config, sequences: pl.DataFrame, n_items: int, out_dir: Path, logger: Logger | None = None
) -> TrainResult:
    """Train on ``sequences`` (the SEQUENCES contract); the best checkpoint goes to ``out_dir/checkpoints``
    (``best-epoch*.ckpt`` files an earlier run left there are removed first).

    On CPU the run is deterministic given ``cfg.train.seed`` (the global deterministic-algorithms flag is
    restored afterwards); on GPU, float32 matmuls may use TF32. ``logger`` None means no logging at all.
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
    checkpoint = _best_checkpoint(Path(out_dir) / "checkpoints")
    timer = _EpochTimer()
    callbacks = [EarlyStopping(monitor=MONITOR, mode="max", patience=t.patience), checkpoint, timer]
    trainer = _trainer(cfg, Path(out_dir), callbacks, logger, math.ceil(len(data.train_users) / t.batch_size))
    start = time.perf_counter()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings():
            # Batches are slices of in-memory tensors; worker processes would only add overhead.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer.fit(system, datamodule=data)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    wall = time.perf_counter() - start
    if not checkpoint.best_model_path:
        raise RuntimeError(f"training stopped before any checkpoint was written to {checkpoint.dirpath}")
    best_path = Path(checkpoint.best_model_path)
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    system.load_state_dict(state["state_dict"])
    return TrainResult(
        model=system.model.cpu().eval(),
        best_checkpoint=best_path,
        best_val_ndcg=float(checkpoint.best_model_score),
        epochs_run=len(timer.durations),
        best_epoch=int(state["epoch"]),
        wall_time_s=wall,
        seconds_per_epoch=sum(timer.durations) / max(len(timer.durations), 1),
    )


def _best_checkpoint(ckpt_dir: Path) -> ModelCheckpoint:
    for stale in ckpt_dir.glob("best-epoch*.ckpt"):
        stale.unlink()
    return ModelCheckpoint(
        dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
        monitor=MONITOR, mode="max", save_top_k=1,
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
        default_root_dir=out_dir,
        log_every_n_steps=min(50, n_batches),
    )
