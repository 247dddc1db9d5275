"""Fit SASRec with Lightning: early stopping and best checkpoint on ``val/ndcg_at_10``; crash-resumable."""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from pytorch_lightning.loggers import Logger

from recsys.checkpoint import (
    BEST,
    LAST,
    AtomicCheckpointIO,
    ResumePoint,
    RunStamp,
    resume_point,
    run_identity,
)
from recsys.config import Config, ConfigError, quiet_console
from recsys.data import ItemAttributes, SequenceDataModule, derive_seed
from recsys.distributed import RankShardedData
from recsys.faults import fault_point
from recsys.model import SASRec
from recsys.signals import SynchronizedSigterm
from recsys.system import MONITOR, SASRecSystem

if TYPE_CHECKING:
    from recsys.warmstart import WarmStart

log = logging.getLogger(__name__)

STEP_STREAM = 0  # derive_seed stream of the per-step reseeding (recsys.data uses 1 for the training order)


@dataclass
class TrainResult:
    """``model`` has the best checkpoint's weights, is on CPU and in eval mode.

    ``best_epoch`` is 0-based (as in Lightning); ``seconds_per_epoch`` is the mean wall time of an epoch
    (training plus validation) over all epochs, those before a resume included, and
    ``train_seconds_per_epoch`` the same without validation; ``wall_time_s`` covers this call only;
    ``resumed_from_epoch`` is the epoch of the checkpoint training resumed from, if any; ``history`` has one
    row per epoch (epoch, elapsed_s, train_s: that epoch without validation, val_ndcg_at_10, fit_s: seconds
    from the start of training to the end of the epoch's validation, before its checkpoints are written: the
    clock that ``train.max_time_s`` bounds, checkpoint writes between epochs included, which ``elapsed_s``
    leaves out; over a resume it goes on from the resumed epoch's, as the budget does, so what a killed call
    spent after its last checkpoint is in neither).
    """

    model: SASRec
    best_checkpoint: Path
    best_val_ndcg: float
    epochs_run: int
    best_epoch: int
    wall_time_s: float
    seconds_per_epoch: float
    resumed_from_epoch: int | None = None
    train_seconds_per_epoch: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # where the initial weights came from and WarmStart.apply's counts; None = a random initialisation (of the
    # run that began training, when it resumed)
    warm_start: dict[str, Any] | None = None


class _EpochTimer(Callback):
    """Wall time per epoch (with and without validation) and the validation curve; survives a resume.

    ``history`` rows: epoch (0-based), seconds since fitting started (this call and the calls before a resume,
    summed), that epoch's val NDCG@10. On CUDA the clock is read after a device synchronise.
    """

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.train_durations: list[float] = []
        self.history: list[dict[str, float]] = []
        self._start = 0.0
        self._fit_start = 0.0

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # where Lightning's Timer (max_time) starts counting; a resumed run goes on from the fit_s of its last
        # checkpointed epoch, as the Timer goes on from the elapsed time that checkpoint saved
        before = self.history[-1].get("fit_s", 0.0) if self.history else 0.0
        self._fit_start = self._now(pl_module) - before

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._now(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.train_durations.append(self._now(pl_module) - self._start)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # In Lightning 2.x this hook runs after the epoch's validation loop (and before checkpointing).
        now = self._now(pl_module)
        self.durations.append(now - self._start)
        val = trainer.callback_metrics.get(MONITOR)
        train_s = self.train_durations[-1] if len(self.train_durations) == len(self.durations) else float("nan")
        self.history.append({"epoch": trainer.current_epoch, "elapsed_s": sum(self.durations), "train_s": train_s,
                             "val_ndcg_at_10": float(val) if val is not None else float("nan"),
                             "fit_s": now - self._fit_start})

    def state_dict(self) -> dict[str, Any]:
        return {"durations": list(self.durations), "train_durations": list(self.train_durations),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.durations = list(state_dict["durations"])
        self.train_durations = list(state_dict.get("train_durations", []))
        self.history = [dict(h) for h in state_dict.get("history", [])]


class _StepSeed(Callback):
    """Reseeds torch, numpy and random before every training step from (seed, epoch, batch) alone.

    Lightning does not restore the global RNG on resume, and what draws from it between steps (a new
    DataLoader iterator draws a base seed) differs between a fresh and a resumed epoch; with this a resumed
    run draws the same dropout masks and negatives as an uninterrupted one. Under DDP the rank is part of the
    seed, so that the processes do not draw the same masks for different users.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        keys = (trainer.current_epoch, batch_idx) + ((trainer.global_rank,) if trainer.world_size > 1 else ())
        seed = derive_seed(self.seed, STEP_STREAM, *keys)
        seed_step_generators(seed, pl_module.device)
        np.random.seed(seed)
        random.seed(seed)


def seed_step_generators(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a training step on ``device`` draws from: the CPU's and,
    on a GPU, that device's. ``torch.manual_seed`` also seeds every other device and backend through lazy
    calls that format the Python stack each time: 0.37 ms per call against 4 µs on the 2-core CPU, paid on
    every step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.default_generators[index].manual_seed(seed)


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

    Raises :class:`ConfigError` (a usage error, exit 2 from the CLI) if ``"gpu"`` is asked for without CUDA.
    """
    has_cuda = torch.cuda.is_available()
    if accelerator == "gpu" and not has_cuda:
        raise ConfigError("train.accelerator is 'gpu' but torch sees no CUDA GPU on this machine (CPU-only "
                          "build, no driver, or CUDA_VISIBLE_DEVICES empty); set train.accelerator=auto (the "
                          "GPU when there is one, else the CPU) or train.accelerator=cpu")
    accelerator = ("gpu" if has_cuda else "cpu") if accelerator == "auto" else accelerator
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return accelerator, precision


def check_compile_toolchain(compile_step: bool, accelerator: str) -> None:
    """``train.compile`` on the CPU needs a C++ compiler (inductor builds the step as C++): without one the
    first training step would fail deep inside torch. Raises :class:`ConfigError` naming the key instead.
    ``accelerator`` is the resolved one (``"cpu"`` or ``"gpu"``); GPU steps compile to Triton kernels.
    """
    if not compile_step or accelerator != "cpu":
        return
    # Inductor's own search (its cpp.cxx setting from CXX, then g++ / clang++), imported only when compiling.
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or whatever a torch version raises for "none found"
        raise ConfigError(f"train.compile is true on the CPU, but torch.compile finds no C++ compiler ({e}); "
                          "install one (g++ or clang++, or set CXX), or set train.compile=false") from None


def train_model(
    cfg: Config,
    sequences: pl.DataFrame,
    n_items: int,
    checkpoint_dir: Path,
    logger: Logger | None = None,
    allow_resume: bool = True,
    warm_start: WarmStart | None = None,
    warm_source: dict[str, Any] | None = None,
    attributes: ItemAttributes | None = None,
    n_event_types: int = 0,
    type_weights: torch.Tensor | None = None,
) -> TrainResult:
    """Train on ``sequences`` (the SEQUENCES contract), checkpointing into ``checkpoint_dir``.

    Checkpoints: ``best-epochNNN.ckpt`` (best val NDCG@10) and ``last.ckpt`` (end of the latest epoch, or of the latest one ``train.checkpoint_interval_s`` let write), each
    written atomically and stamped with :func:`recsys.checkpoint.run_identity`. If ``last.ckpt`` is there and
    carries this run's identity, training resumes from it (and returns at once if the run had finished);
    otherwise the directory's checkpoints are removed and training starts afresh. Every step's randomness
    (order, dropout, negatives) depends only on (``cfg.train.seed``, epoch, batch), so on CPU a resumed run
    ends with the same weights as an uninterrupted one (the global deterministic-algorithms flag is restored
    afterwards); on GPU, float32 matmuls may use TF32. ``logger`` None means no logging at all.

    With ``train.devices`` x ``train.num_nodes`` > 1 this is one process of a DDP run (every process calls
    it, see README "Scale-out"): each takes its share of every global batch (:class:`RankShardedData`),
    validation metrics are reduced over all of them, and only global rank 0 writes checkpoints or cleans
    ``checkpoint_dir``; every process returns the same best checkpoint's weights. ``allow_resume`` False
    never resumes (a non-zero rank of a ``--force`` run, whose rank 0 discarded the directory).
    ``warm_start`` loads an earlier model's weights into the new model before training (a resumed run then
    continues from its checkpoint, as always); the result's ``warm_start`` is ``warm_source`` (where that model
    came from) with the counts of the warm start, as recorded in the checkpoint by the run that began training
    (a resumed run's source may have moved since, e.g. to tonight's own published model). ``attributes``: the item attributes the model embeds (None: ids
    only); they are part of the run's identity, so a run resumes only onto the same ones. ``n_event_types`` > 0:
    the model embeds each input event's type (the sequences' schema.SEQUENCE_TYPES, 0..n_event_types).
    ``type_weights`` (n_types + 1,): the CE loss weight of each target event type (index = type_idx, 0 = none);
    the batches then carry the types whether or not the model embeds them.
    Raises ``ConfigError`` (naming the split keys) if no user can be trained on or no user has val items, and
    ``ValueError`` if fewer users than processes have val items.
    """
    L.seed_everything(cfg.train.seed, workers=True)
    t = cfg.train
    data = RankShardedData(
        sequences, n_items, cfg.model.max_len, t.batch_size, t.val_batch_size, t.seed, t.window_stride,
        t.group_by_length, t.static_shapes, n_event_types if type_weights is None else len(type_weights) - 1,
    )
    if len(data.train_users) == 0 or len(data.val_users) == 0:  # the features' split left nothing to train or
        f = cfg.features  # validate on (the epoch is chosen on validation): the config's split keys to change
        hint = (f"features.split=time puts the events between features.val_cutoff ({f.val_cutoff}) and "
                f"features.test_cutoff ({f.test_cutoff}) in validation: move the cutoffs apart so that some fall "
                "there" if f.split == "time" else
                "features.split=leave_one_out validates users with 3 events or more: lower features.min_user_events "
                "filters or feed more events")
        raise ConfigError(f"the features hold {len(data.train_users)} users with 2+ train items and "
                          f"{len(data.val_users)} with validation items (val_items); training needs both. {hint}")
    system = SASRecSystem.from_config(cfg, n_items, attributes, n_event_types)
    if type_weights is not None:
        system.set_type_weights(type_weights)
    warm = None if warm_start is None else {**(warm_source or {}), **warm_start.apply(system.model)}
    checkpoint_dir = Path(checkpoint_dir)
    identity = run_identity(cfg, sequences, n_items, attributes, n_event_types)
    best, timer = _BestCheckpoint(checkpoint_dir), _EpochTimer()
    early = EarlyStopping(monitor=MONITOR, mode="max", patience=t.patience)
    stamp = RunStamp(identity, early, t.max_time_s, {"warm_start": warm})
    callbacks = [
        early, best, _LastCheckpoint(checkpoint_dir, t.checkpoint_interval_s, best), timer, _StepSeed(t.seed),
        stamp, _FaultPoints(),
    ]
    if t.ema_decay is not None:
        # Parameters only: the model has no statistics buffers, and sampling_probs must stay the module's own.
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay, use_buffers=False))
    # Last, so that the other callbacks finish a batch before it may stop the run; inert with one process.
    callbacks.append(SynchronizedSigterm())
    n_batches = math.ceil(len(data.train_rows) / t.batch_size)
    trainer = _trainer(cfg, checkpoint_dir, callbacks, logger, n_batches)
    if trainer.world_size > len(data.val_users):
        raise ValueError(f"sequences: {len(data.val_users)} users with val_items, fewer than the "
                         f"{trainer.world_size} DDP processes; validate on more users or use fewer devices")
    # Every rank reads the same decision from the same directory; only rank 0 removes what it does not resume.
    resume = resume_point(checkpoint_dir, identity, clean=trainer.is_global_zero) if allow_resume else None
    if resume is not None:
        log.info("resuming from %s (end of epoch %d)", resume.path, resume.epoch)
        if resume.extra is not None:  # the weights are that run's: so is the warm start they began from, in
            warm = resume.extra.get("warm_start")  # this run's checkpoints too (a third try reads them)
            stamp.extra = resume.extra
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
        train_seconds_per_epoch=sum(timer.train_durations) / max(len(timer.train_durations), 1),
        history=list(timer.history),
        warm_start=warm,
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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # DDP is over; a later fit in this process starts anew


class _Rebased(ModelCheckpoint):
    """A checkpoint callback whose saved file paths follow the directory: Lightning keeps absolute paths and,
    when the directory is reached under another path (the work dir moved, shared storage mounted elsewhere on
    the next machine), drops the best score and keeps the old best path, so a finished run could not be
    resumed and an unfinished one forgot its best epoch. Every file is ours and lies in ``dirpath``: rebase
    them by name before Lightning reads the state."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:
            def moved(path: Any) -> Any:
                return str(Path(self.dirpath) / Path(path).name) if path else path

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{key: moved(state_dict.get(key))
                             for key in ("best_model_path", "kth_best_model_path", "last_model_path")},
                          "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


class _BestCheckpoint(_Rebased):
    """best-epochNNN.ckpt, the best validation NDCG@10 so far. The best file it replaces is removed only once
    last.ckpt names the new one (:meth:`release`): last.ckpt of an earlier epoch still names the old file, and a
    run killed in between resumes from there (the new file, of an epoch after the resume point, goes)."""

    def __init__(self, ckpt_dir: Path) -> None:
        super().__init__(dirpath=ckpt_dir, filename=BEST + "{epoch:03d}", auto_insert_metric_name=False,
                         monitor=MONITOR, mode="max", save_top_k=1)
        self._replaced: list[str] = []

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._replaced.append(filepath)

    def release(self, trainer: L.Trainer) -> None:
        """Remove the best files replaced so far; call once last.ckpt holds this callback's current state."""
        for path in self._replaced:
            if path != self.best_model_path:
                super()._remove_checkpoint(trainer, path)
        self._replaced.clear()


class _LastCheckpoint(_Rebased):
    """last.ckpt, the resume point: at the end of every epoch, or with ``interval_s`` at the end of an epoch once
    that many seconds passed since the previous write, and always at the epoch where training stops (early
    stopping and the time budget have decided by then; so has max_epochs), so that a finished run resumes as
    finished.

    Not ``save_last=True`` on the best callback: that writes last.ckpt only in epochs where the best one
    improved, so a resumed run would redo up to ``patience`` epochs. It must come after the best callback,
    so that last.ckpt holds the best callback's state of the same epoch.
    """

    def __init__(self, ckpt_dir: Path, interval_s: float | None, best: _BestCheckpoint | None = None) -> None:
        super().__init__(dirpath=ckpt_dir, filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False)
        self.interval_s, self.best = interval_s, best
        self._written_at = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._written_at = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        due = self.interval_s is None or time.perf_counter() - self._written_at >= self.interval_s
        if self.interval_s is not None:
            # Under DDP saving is collective (a barrier): every rank takes rank 0's decision, not its own clock's.
            due = bool(trainer.strategy.broadcast(due, src=0))
        if due or last_epoch or trainer.should_stop:
            super().on_train_epoch_end(trainer, pl_module)
            self._written_at = time.perf_counter()
            if self.best is not None:  # last.ckpt now names the current best file: the ones it replaced can go
                self.best.release(trainer)


def _trainer(
    cfg: Config, out_dir: Path, callbacks: list[Callback], logger: Logger | None, n_batches: int
) -> L.Trainer:
    accelerator, precision = resolve_hardware(cfg.train.accelerator, cfg.train.precision)
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")
    t = cfg.train
    # ddp: one process per device, launched by Lightning (it re-runs the command line with LOCAL_RANK set)
    # or by torchrun/SLURM. Not ddp_spawn: it hands the launching process only the weights back, not the
    # callbacks' state (best score, epoch times), and would pickle the MLflow logger.
    strategy = "ddp" if t.strategy == "auto" and t.devices * t.num_nodes > 1 else t.strategy
    return L.Trainer(
        max_epochs=cfg.train.max_epochs,
        max_time=None if cfg.train.max_time_s is None else dt.timedelta(seconds=cfg.train.max_time_s),
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        # RankShardedData splits the batches itself: Lightning's DistributedSampler would shard whole batches
        # and repeat validation batches to even out the ranks, counting some users twice.
        use_distributed_sampler=False,
        precision=precision,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        enable_progress_bar=cfg.train.progress and not quiet_console(),
        enable_model_summary=False,
        deterministic=accelerator == "cpu",
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out_dir,
        log_every_n_steps=min(50, n_batches),
    )
