"""Demo events with a planted sequential pattern and a Zipf popularity skew.

Items sit on one random cycle (a fixed successor permutation without fixed points). Each user's first item
is Zipf-popular; every next item is the successor of the previous one with probability ``follow_prob``,
otherwise a fresh Zipf-popular draw. So the next item is predictable from the previous one about
``follow_prob`` of the time (a sequential model wins), while popularity alone is a weak baseline.
A ``duplicate_rate`` fraction of rows is appended as exact copies, to exercise de-duplication.
"""

from __future__ import annotations

import random

import numpy as np
import polars as pl

from features.schema import EVENT_TYPE, ITEM_ID, SEQUENCES, TIMESTAMP, USER_ID
from recsys.config import SyntheticConfig

EVENT_TYPES = ("view", "click", "purchase")
_EVENT_TYPE_PROBS = (0.7, 0.2, 0.1)
_START = 1_600_000_000  # epoch seconds of the first possible event
_MAX_GAP = 3_600  # seconds between a user's consecutive events: 1.._MAX_GAP


def zipf_probabilities(n_items: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """(n_items,) probabilities proportional to 1 / rank**exponent, ranks shuffled over the items."""
    weights = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** exponent
    return rng.permutation(weights / weights.sum())


def successor_cycle(n_items: int, rng: np.random.Generator) -> np.ndarray:
    """(n_items,) successor of each item position: one random cycle through all items (no fixed points)."""
    order = rng.permutation(n_items)
    successor = np.empty(n_items, dtype=np.int64)
    successor[order] = np.roll(order, -1)
    return successor


def walk_items(
    cfg: SyntheticConfig, popularity: np.ndarray, successor: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(n_users, max_len) item positions; vectorised over users, one step per column."""
    shape = (cfg.n_users, cfg.max_len)
    fresh = rng.choice(cfg.n_items, size=shape, p=popularity)  # (U, L) Zipf draws
    follow = rng.random(shape) < cfg.follow_prob  # (U, L)
    items = fresh.copy()
    for t in range(1, cfg.max_len):
        items[:, t] = np.where(follow[:, t], successor[items[:, t - 1]], fresh[:, t])
    return items


def generate_events(cfg: SyntheticConfig) -> pl.DataFrame:
    """Seeded events: ``user_id``, ``item_id`` (sparse external ids), ``timestamp`` (epoch s), ``event_type``.

    Rows are sorted by user then time; each user's timestamps strictly increase except the exact duplicate
    rows. Raises ValueError if ``min_len > max_len``.
    """
    if cfg.min_len > cfg.max_len:
        raise ValueError(
            f"synthetic.min_len ({cfg.min_len}) must not exceed synthetic.max_len ({cfg.max_len})"
        )
    rng = np.random.default_rng(cfg.seed)
    item_ids = np.sort(rng.choice(10 * cfg.n_items, size=cfg.n_items, replace=False)) + 1
    items = walk_items(
        cfg, zipf_probabilities(cfg.n_items, cfg.zipf_exponent, rng), successor_cycle(cfg.n_items, rng), rng
    )
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=cfg.n_users)  # (U,)
    keep = np.arange(cfg.max_len)[None, :] < lengths[:, None]  # (U, L)
    start = _START + rng.integers(0, 30 * 86_400, size=(cfg.n_users, 1))
    times = start + np.cumsum(rng.integers(1, _MAX_GAP + 1, size=items.shape), axis=1)  # (U, L)
    users = np.broadcast_to(np.arange(1, cfg.n_users + 1)[:, None], items.shape)
    kinds = rng.choice(len(EVENT_TYPES), size=int(keep.sum()), p=_EVENT_TYPE_PROBS)
    events = pl.DataFrame(
        {
            USER_ID: users[keep].astype(np.int64),
            ITEM_ID: item_ids[items[keep]].astype(np.int64),
            TIMESTAMP: times[keep].astype(np.int64),
            EVENT_TYPE: np.asarray(EVENT_TYPES)[kinds],
        }
    )
    return add_duplicates(events, cfg.duplicate_rate, rng)


def add_duplicates(events: pl.DataFrame, rate: float, rng: np.random.Generator) -> pl.DataFrame:
    """Append ``round(rate * rows)`` exact copies of random rows, then re-sort by user and time (stable)."""
    n_copies = round(rate * events.height)
    copies = events[np.sort(rng.choice(events.height, size=n_copies, replace=False))]
    return pl.concat([events, copies]).sort([USER_ID, TIMESTAMP], maintain_order=True)


def planted_sequences(n_users: int, n_items: int, seed: int = 0) -> pl.DataFrame:
    """A ``SEQUENCES`` table (what the features job writes) whose next item is always the previous one + 1,
    cyclically over item indices 1..n_items: per user a random start, 5-15 train items, the val item next,
    no test items. Model input with a planted answer, without events or the features job (tests, benchmarks).
    """
    rng = random.Random(seed)
    train, val = [], []
    for _ in range(n_users):
        start, length = rng.randrange(n_items), rng.randint(5, 15)
        items = [(start + j) % n_items + 1 for j in range(length + 1)]
        train.append(items[:-1])
        val.append(items[-1:])
    return pl.DataFrame({"user_idx": list(range(n_users)), "train_items": train, "val_items": val,
                         "test_items": [[]] * n_users}, schema=SEQUENCES)
