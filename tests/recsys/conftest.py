"""Fixtures shared by the recsys tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (bit-for-bit comparisons; the same count as OMP_NUM_THREADS=1 children)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
