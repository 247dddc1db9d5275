"""Crash-safe Lightning checkpoints: atomic files, a run-identity stamp, and the choice of what to resume.

A checkpoint counts only if it is complete and was written by the same run: :class:`AtomicCheckpointIO`
makes every file appear whole or not at all, and :class:`RunStamp` writes :func:`run_identity` into it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, Timer
from pytorch_lightning.plugins.io import TorchCheckpointIO

from recsys.config import Config, ModelConfig, TrainConfig, non_default, without_budget
from recsys.data import ItemAttributes
from recsys.storage import atomic_write_bytes, remove_stale_temps

log = logging.getLogger(__name__)

LAST = "last"  # file stem of the resume point, written at the end of an epoch (train.checkpoint_interval_s)
BEST = "best-epoch"  # file stem prefix of the best checkpoint, followed by its 0-based epoch (3 digits)
IDENTITY_KEY = "recsys_run_identity"
STOPPED_KEY = "recsys_should_stop"
FINAL_KEY = "recsys_stop_final"  # the stop is no time budget's (early stopping): never train on after it
ELAPSED_KEY = "recsys_train_elapsed_s"  # training seconds spent by then (Lightning's Timer), or None
EXTRA_KEY = "recsys_extra"  # RunStamp's extra, e.g. the warm start report of the run that began training


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary sibling, fsyncs it and renames it into place.

    Lightning's own save stages the file with ``tempfile.mkstemp()`` (usually under /tmp) and moves it: when
    /tmp is another filesystem that move is a copy into place, and a killed process leaves the staged file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue(), fault=f"checkpoint-write-e{checkpoint.get('epoch')}")


class RunStamp(Callback):
    """Stamps every checkpoint with the run identity, whether training had decided to stop and why, the
    training seconds spent, and ``extra`` (e.g. the warm start's report, which a resumed run gives back).

    On resume a final stop (early stopping, or an older checkpoint that does not say why) is restored, so a run
    killed after it does not train on. A stop by the time budget (``budget_s``, train.max_time_s) is restored
    only while the budget of the resuming run is spent too: the same budget resumes as finished (a rerun changes
    nothing), a larger one, or none, lets training go on from the next epoch.
    """

    def __init__(self, identity: str, early_stopping: EarlyStopping | None = None, budget_s: float | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.identity, self.early_stopping, self.budget_s, self.extra = identity, early_stopping, budget_s, extra

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = self.identity
        checkpoint[STOPPED_KEY] = bool(trainer.should_stop)
        early = self.early_stopping
        checkpoint[FINAL_KEY] = bool(trainer.should_stop) and (
            early is None or early.stopped_epoch > 0 or early.wait_count >= early.patience
            or not _budget_spent(trainer))
        timer = _timer(trainer)
        checkpoint[ELAPSED_KEY] = None if timer is None else float(timer.time_elapsed("train"))
        checkpoint[EXTRA_KEY] = self.extra

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        stopped = bool(checkpoint.get(STOPPED_KEY, False))
        final = checkpoint.get(FINAL_KEY)
        if stopped and final is not None and not final:  # the time budget stopped it: is tonight's spent too?
            elapsed = checkpoint.get(ELAPSED_KEY)
            stopped = self.budget_s is not None and (elapsed is None or elapsed >= self.budget_s)
        trainer.should_stop = trainer.should_stop or stopped


def _timer(trainer: L.Trainer) -> Timer | None:
    """Lightning's Timer callback (train.max_time_s), if the trainer has a time budget."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def _budget_spent(trainer: L.Trainer) -> bool:
    timer = _timer(trainer)
    remaining = None if timer is None else timer.time_remaining()
    return remaining is not None and remaining <= 0


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    epoch: int  # 0-based epoch at whose end the checkpoint was written
    extra: dict[str, Any] | None = None  # RunStamp's extra of the run that wrote it (None: an older checkpoint)


def run_identity(cfg: Config, sequences: pl.DataFrame, n_items: int,
                 attributes: ItemAttributes | None = None, n_event_types: int = 0) -> str:
    """SHA-256 of what decides the training outcome: ``model`` and ``train`` config (less ``train.progress``),
    ``evaluate.exclude_seen`` (validation ranks by it, so it picks the best epoch), the catalogue size, the
    contents of ``sequences``, the item ``attributes`` (if any) and the number of event types the model embeds
    (if any).

    ``train.max_time_s`` is a budget, not a setting of the run: it is hashed as unset, so a run stopped (or
    killed) under one budget resumes under another, e.g. a larger one to let it finish, or a small one to stop
    it after one more step and keep its best checkpoint.
    """
    # the keys that differ from their defaults (recsys.config.non_default): a key added by an upgrade, at its
    # default, leaves the identity of a run killed before the upgrade as it was
    train = non_default(without_budget(cfg.train.model_dump(mode="json", exclude={"progress"})),
                        TrainConfig().model_dump(mode="json"))
    model = non_default(cfg.model.model_dump(mode="json"), ModelConfig().model_dump(mode="json"))
    settings = {"model": model, "train": train, "n_items": n_items}
    if not cfg.evaluate.exclude_seen:  # validation ranks seen items too: another best epoch (only then, as below)
        settings["evaluate"] = {"exclude_seen": False}
    if n_event_types:  # only then, so that the identities of runs without types stay as they were
        settings["n_event_types"] = n_event_types
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sequences.columns:
        column = sequences[name]
        if isinstance(column.dtype, pl.List):
            digest.update(column.list.len().fill_null(0).to_numpy().tobytes())
            column = column.explode()
        digest.update(column.fill_null(0).to_numpy().tobytes())
    if attributes is not None:
        for tensor in (attributes.ids, attributes.columns, attributes.trained):
            if tensor is None:
                continue
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def resume_point(directory: Path, identity: str, clean: bool = True) -> ResumePoint | None:
    """``directory/last.ckpt`` if a run with this ``identity`` wrote it, else None.

    With ``clean`` (the default; under DDP only on rank 0, the only writer), leftover temporary files of
    killed writers are removed first, and when there is nothing to resume every ``*.ckpt`` in ``directory``
    is removed too (they belong to another run), so the run starts clean.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale_temps(directory)
    last = directory / f"{LAST}.ckpt"
    state = _read(last) if last.is_file() else None
    if state is not None and state.get(IDENTITY_KEY) == identity:
        epoch = int(state["epoch"])
        if clean:
            _remove_later_best(directory, epoch)
        return ResumePoint(last, epoch, state.get(EXTRA_KEY))
    if not clean:
        return None
    if state is not None:
        log.warning("%s was written by another run (different config or data); starting afresh", last)
    for stale in directory.glob("*.ckpt"):
        stale.unlink()
    return None


def cut_by_budget(path: Path) -> bool:
    """Whether the checkpoint at ``path`` records a stop by the time budget (train.max_time_s), from which a
    larger budget, or none, trains on (:class:`RunStamp`); False when it is missing or unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the flags, not the weights
    except Exception:  # noqa: BLE001 - missing or unreadable: nothing to go on from
        return False
    return bool(state.get(STOPPED_KEY)) and state.get(FINAL_KEY) is False


def _remove_later_best(directory: Path, epoch: int) -> None:
    """Best checkpoints of epochs after the resume point: written before the kill, and the resumed run does not
    know them (its best callback's state is that of ``epoch``); it writes them again if those epochs improve."""
    for path in directory.glob(f"{BEST}*.ckpt"):
        match = re.match(rf"{BEST}(\d+)", path.stem)
        if match and int(match[1]) > epoch:
            log.info("removing %s: written after the resume point (end of epoch %d)", path, epoch)
            path.unlink()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is simply not resumable
        log.warning("%s cannot be read (%s: %s); starting afresh", path, type(exc).__name__, exc)
        return None
