"""A synthetic clustered catalogue for the scale benchmarks (eval_scale, candidates_scale).

Item vectors: a random centre per cluster plus Gaussian noise, every item in one cluster. A user belongs to
one cluster: vector = its centre plus noise, history (seen) and one held-out target drawn from the cluster's
items, so a user's best items concentrate in its cluster and ANN recall is meaningful (uniform random
vectors have no neighbourhoods). Users are generated block by block, each block from its own seed, so any
block can be regenerated alone and memory stays bounded by the block.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch

from recsys.data import RaggedItems


class UserBlock(NamedTuple):
    """vectors (B, D) float32; seen: B rows of item positions (target never among them); targets (B, 1)."""

    vectors: torch.Tensor
    seen: RaggedItems
    targets: torch.Tensor


class ClusteredCatalogue:
    """``n_items`` item vectors of dimension ``dim`` in ``n_clusters`` clusters (seeded by ``seed``)."""

    def __init__(self, n_items: int, dim: int, n_clusters: int, seed: int = 0, noise: float = 0.6) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim, self.noise, self.seed = dim, noise, seed
        self.centres = torch.randn(n_clusters, dim, generator=g)  # (C, D)
        cluster = torch.randint(0, n_clusters, (n_items,), generator=g)  # (I,)
        self.items = torch.empty(n_items, dim)  # (I, D)
        for start in range(0, n_items, 1 << 16):  # noise in chunks: no second (I, D) temporary
            rows = slice(start, start + (1 << 16))
            self.items[rows] = self.centres[cluster[rows]] + noise * torch.randn(
                cluster[rows].shape[0], dim, generator=g)
        self.members = torch.argsort(cluster, stable=True)  # (I,) item positions grouped by cluster
        counts = torch.bincount(cluster, minlength=n_clusters)  # (C,)
        self.first = torch.cumsum(counts, 0) - counts  # (C,) where each cluster starts in members
        self.size = counts.clamp(min=1)  # (C,) an empty cluster draws a neighbouring cluster's item

    def users(self, block: int, n_users: int, seen_min: int = 10, seen_max: int = 50) -> UserBlock:
        """Block number ``block`` of ``n_users`` users, each with U(seen_min, seen_max) seen items (repeats
        possible, the target removed) and one target from its cluster."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + block + 1)
        cluster = torch.randint(0, len(self.centres), (n_users,), generator=g)  # (B,)
        vectors = self.centres[cluster] + self.noise * torch.randn(n_users, self.dim, generator=g)  # (B, D)
        lengths = torch.randint(seen_min, seen_max + 1, (n_users,), generator=g)  # (B,)
        owner = torch.repeat_interleave(torch.arange(n_users), lengths)  # (S,)
        draws = self._draw(cluster[owner], g)  # (S,)
        targets = self._draw(cluster, g).unsqueeze(1)  # (B, 1)
        keep = draws != targets[owner, 0]  # (S,)
        offsets = torch.zeros(n_users + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(owner[keep], minlength=n_users).cumsum(0)
        return UserBlock(vectors, RaggedItems(draws[keep].int(), offsets), targets)

    def _draw(self, cluster: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One uniform item position of each given cluster (N,) -> (N,)."""
        pick = (torch.rand(cluster.shape[0], generator=g) * self.size[cluster]).long()  # (N,)
        slot = self.first[cluster] + pick.clamp(max=self.size[cluster] - 1)  # (N,)
        return self.members[slot.clamp(max=len(self.members) - 1)]


def add_catalogue_args(p: argparse.ArgumentParser) -> None:
    """The size and seed of the synthetic catalogue, shared by the scale benchmarks' command lines."""
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
