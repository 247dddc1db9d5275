"""Sequence tensors and the Lightning data module."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_lists(lists: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """Left-pad integer lists with 0 into a (N, L) int64 tensor, keeping the LAST ``length`` items.

    ``length`` None means the longest list's length (at least 1).
    """
    width = length if length is not None else max((len(x) for x in lists), default=0)
    width = max(width, 1)
    out = torch.zeros(len(lists), width, dtype=torch.long)
    for row, items in enumerate(lists):
        tail = list(items)[-width:]
        if tail:
            out[row, width - len(tail):] = torch.as_tensor(tail, dtype=torch.long)
    return out
