"""Where the evaluate and candidates jobs run the model, and the exact float32 it ranks in.

``evaluate.device`` / ``candidates.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) become a torch device
once, at the start of the job, so a GPU that is asked for but missing fails before anything is read or written.
Training picks its hardware through Lightning instead (``recsys.training.resolve_hardware``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from recsys.config import ConfigError


def resolve_device(setting: str, key: str) -> torch.device:
    """The torch device of a ``Device`` config value; ``key`` is its dotted path (for the error message).

    ``auto``: CUDA when ``torch.cuda.is_available()``, else the CPU. Raises :class:`ConfigError` naming
    ``key`` when ``cuda`` / ``cuda:N`` is asked for and there is no such GPU.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} is {setting!r} but torch sees no CUDA GPU on this machine (CPU-only build, "
                          f"no driver, or CUDA_VISIBLE_DEVICES empty); set {key}=auto (the GPU when there "
                          f"is one, else the CPU) or {key}=cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{key} is {setting!r} but torch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}; "
                          f"set {key} to one of them, or to cuda or auto")
    return device


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """Autocast off and full-precision float32 matmuls for the block; the global setting is restored after.

    Training on GPU switches float32 matmuls to TF32 (``torch.set_float32_matmul_precision("high")``) for the
    whole process; ranking with those rounded scores in the same process (``recsys run``) would tie or swap
    items that float32 tells apart.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode, no_grad and :func:`exact_float32` (ties are not favoured) for the block, the mode restored
    after; yields the model's device, where the inputs must go. What evaluation and candidates score under."""
    was_training = model.training
    model.train(False)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), exact_float32(device):
            yield device
    finally:
        model.train(was_training)
