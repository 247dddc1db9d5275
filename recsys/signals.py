"""SIGTERM under DDP: every process stops at the same point of its collective sequence, so none waits forever.

Lightning 2.6's own SIGTERM handler runs a ``dist.broadcast`` inside the handler, i.e. wherever the signal
lands in the process's sequence of collectives, while the training loop broadcasts once per step: the
signalled rank's extra broadcast pairs with a different collective on the other ranks (a gradient
all-reduce, a validation reduction) and the run hangs, or a rank dies with gloo's "Connection closed by peer"
instead of exiting 143. Lightning also stops a signalled rank on its own at the next batch, while the
others go on to their next collective.

:class:`SynchronizedSigterm` replaces that handler, on every rank, with one that only sets a flag. The
flags are combined (any rank signalled: all stop) at points every rank reaches in the same order, and every
rank then raises Lightning's ``SIGTERMException``, as Lightning's own SIGTERM path does with one process:
the CLI turns it into exit 143, and the rerun resumes from the last checkpoint written.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import pytorch_lightning as L
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class SynchronizedSigterm(Callback):
    """Under DDP (world size > 1), stop every process at the same point once any of them got SIGTERM.

    The handler is installed when the sanity check or training starts, after Lightning registered its own
    (``Trainer._run`` registers it just before running the stage) and in its place; Lightning's teardown
    restores the handler that was there before fit. The flags are combined with one all-reduce at the end of
    every ``every_n_batches``-th training batch and of an epoch's last one, at the end of every validation
    (the sanity check's included) and at the end of training, which catches a signal that came after the
    last batch (the last epoch's checkpoints are written by then, so a rerun resumes as finished). Not after
    every batch: the all-reduce's result is read on the host, which waits for the GPU to finish the step's
    queued work, so a per-step check would stall an asynchronous training loop once per step; every rank
    counts the same batches (each batch is dealt to all ranks), so they agree on where the checks are. A
    signal during validation stops at its end: that epoch's checkpoint is not written, as with one process,
    which stops at the next validation batch.

    With one process every hook returns at once: Lightning's own handling stays as it is. Not covered: a
    signal while Lightning's handler is still the one installed (between its registration and the first
    hook, e.g. in the barrier that starts the stage) takes Lightning's path.
    """

    def __init__(self, every_n_batches: int = 8) -> None:
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.every_n_batches = every_n_batches
        self.received = False
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = trainer.world_size > 1
        self.received = False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # again: with no sanity check (e.g. a resumed run) this is the first hook

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % self.every_n_batches and batch_idx + 1 < trainer.num_training_batches:
            return  # not a check point: no collective (every rank skips the same batches)
        self._stop_if_received(trainer, f"after training batch {batch_idx} of epoch {trainer.current_epoch}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        where = "the sanity check" if trainer.sanity_checking else f"validation of epoch {trainer.current_epoch}"
        self._stop_if_received(trainer, f"after {where}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_received(trainer, "at the end of training")

    def _install(self) -> None:
        # signal.signal works only in the main thread; Lightning's connector skips registering elsewhere too.
        if self._active and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: no collective, no logging (the signal may land anywhere, a logging call included).
        self.received = True

    def _stop_if_received(self, trainer: L.Trainer, where: str) -> None:
        """All-reduce the flags (a collective every rank runs here, in the same order) and raise
        ``SIGTERMException`` on every rank if any rank was signalled."""
        if not self._active:
            return
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            log.warning("SIGTERM received by %s; every process stops %s",
                        "this process" if self.received else "another process", where)
            raise SIGTERMException
