"""Test hook for crash-safety tests: SIGKILL this process at a named point.

Set ``RECSYS_FAULT=<point>`` in the environment and the process kills itself (SIGKILL: no cleanup, no
``finally``, no atexit) when it reaches :func:`fault_point` with that name. Unset, every call is a no-op
(one environment lookup). ``RECSYS_FAULT_SIGNAL=TERM`` sends SIGTERM instead (what a scheduler sends to
stop a job): the process goes on to whatever its SIGTERM handling does. Named points, in the order a
``recsys train`` run reaches them:

- ``train-batch-e<E>b<B>``: after training batch ``B`` of epoch ``E`` (0-based), before its checkpoint;
- ``epoch-start-e<E>``: at the start of epoch ``E``, i.e. after epoch ``E - 1``'s checkpoints were written;
- ``checkpoint-write-e<E>``: while writing the first checkpoint file of epoch ``E`` (bytes written to the
  temporary file, not yet renamed into place);
- ``model-write``: inside the model directory's temporary copy, after the weights were written;
- ``before-marker``: after the job's outputs are complete, before the success marker is written.

and in a ``recsys candidates`` run:

- ``candidates-scored``: top-K computed, nothing written yet;
- ``candidates-parquet-written`` / ``candidates-manifest-written`` / ``candidates-before-publish``: inside the
  partition's temporary directory, after the Parquet file / the manifest and drift report / everything;
- ``atomic-swap:<dir name>`` (any :func:`recsys.storage.atomic_dir`, e.g. ``atomic-swap:date=2024-03-01``):
  the previous output moved aside, the new one not yet renamed into place;
- ``candidates-published``: the partition renamed into place, before MLflow logging.

and in tracking retention (``recsys prune``, the end of ``recsys run``):

- ``retention-version-deleted``: after each model version it deletes.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "RECSYS_FAULT"
SIGNAL_ENV = "RECSYS_FAULT_SIGNAL"


def fault_point(name: str) -> None:
    """Signal the current process (SIGKILL, or ``RECSYS_FAULT_SIGNAL``) if ``RECSYS_FAULT`` equals ``name``."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL")))
