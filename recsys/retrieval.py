"""Top-K candidate retrieval with FAISS (the only module that imports it).

Scores are inner products of user and item vectors. Ids returned here are ROW POSITIONS in the
``item_vectors`` the index was built from; the caller maps them to item indices and external ids.
Approximate indexes are checked against exact search (:func:`ann_recall`), and a user the approximate
search leaves short of ``k`` unseen items is answered by exact search instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import faiss
import numpy as np

logger = logging.getLogger(__name__)

SeenItems = Sequence[np.ndarray] | np.ndarray | None


class TopK(NamedTuple):
    """ids (U, k) int64 row positions, best first; scores (U, k) float32; stats counters.

    A row is short of ``k`` only when fewer than ``k`` unseen items exist (or, with ``fallback=False``,
    when the index found fewer); its tail holds id -1 and score -inf.
    """

    ids: np.ndarray
    scores: np.ndarray
    stats: dict[str, int]


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """float32, C-contiguous, 2-D and finite: what FAISS expects."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


class IndexBuildError(ValueError):
    """A valid FAISS index that cannot be trained or filled with the given vectors (e.g. too few of them)."""


def build_index(
    item_vectors: np.ndarray,
    factory: str = "Flat",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> faiss.Index:
    """Inner-product index over ``item_vectors`` (I, D) described by a FAISS factory string.

    Trains the index on the vectors when it needs training (IVF, PQ). ``nprobe`` / ``ef_search`` set the
    search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW). Raises ``ValueError`` naming the
    factory string when FAISS rejects it or a parameter, and :class:`IndexBuildError` (a ``ValueError``) when
    the index cannot be trained or filled with these vectors (e.g. fewer vectors than IVF lists).
    """
    x = _as_matrix(item_vectors, "item_vectors")
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS rejects the index factory string {factory!r}: {exc}") from exc
    try:
        if not index.is_trained:
            index.train(x)
        index.add(x)
    except RuntimeError as exc:
        raise IndexBuildError(f"cannot build FAISS index {factory!r} over {x.shape[0]} vectors: {exc}") from exc
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError as exc:
            raise ValueError(f"index {factory!r} has no search parameter {name!r} (got {value})") from exc
    logger.info("built FAISS index %r over %d items of dim %d", factory, index.ntotal, index.d)
    return index


def _seen_csr(seen: SeenItems, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Seen positions as (values, offsets), per user unique; negative entries are padding and dropped.

    Raises ``ValueError`` on a length mismatch or a position >= ``n_items``.
    """
    if seen is None:
        return np.zeros(0, dtype=np.int64), np.zeros(n_users + 1, dtype=np.int64)
    if len(seen) != n_users:
        raise ValueError(f"seen has {len(seen)} rows but there are {n_users} user vectors")
    if isinstance(seen, np.ndarray) and seen.ndim == 2:
        rows = np.repeat(np.arange(n_users), seen.shape[1])
        values = seen.astype(np.int64, copy=False).ravel()
    else:
        lengths = np.fromiter((len(s) for s in seen), dtype=np.int64, count=n_users)
        rows = np.repeat(np.arange(n_users), lengths)
        values = np.concatenate(
            [np.asarray(s, dtype=np.int64).ravel() for s in seen] or [np.zeros(0, np.int64)]
        )
    keep = values >= 0
    if keep.any() and values[keep].max() >= n_items:
        raise ValueError(f"seen holds position {values[keep].max()}, but the index has {n_items} items")
    keys = np.unique(rows[keep] * n_items + values[keep])  # sorted by user, then item
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // n_items, minlength=n_users), out=offsets[1:])
    return keys % n_items, offsets


def _drop_seen(
    ids: np.ndarray, scores: np.ndarray, seen_keys: np.ndarray, n_items: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's first ``k`` results that are real (not -1) and unseen, in the index's order.

    ids, scores: (B, k') from ``index.search`` with k' >= k; seen_keys: sorted ``row * n_items + position``.
    Returns ids (B, k), scores (B, k) padded with -1 / -inf, and the number of real results per row (B,).
    """
    rows = np.arange(ids.shape[0])[:, None]
    ok = (ids >= 0) & ~np.isin(rows * n_items + ids, seen_keys)  # (B, k')
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # valid results first, order kept
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    found = ok.sum(axis=1)
    short = np.arange(top_ids.shape[1])[None, :] >= found[:, None]
    top_ids[short], top_scores[short] = -1, -np.inf
    return top_ids, top_scores, found


def _search_unseen(
    index: faiss.Index, users: np.ndarray, k: int, values: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One search for k + (most seen items of any row) results, seen items then dropped (see _drop_seen)."""
    n_seen = np.diff(offsets)
    kk = int(min(index.ntotal, k + (n_seen.max() if n_seen.size else 0)))
    scores, ids = index.search(users, kk)  # (B, kk) each
    keys = np.repeat(np.arange(users.shape[0]), n_seen) * index.ntotal + values[offsets[0] : offsets[-1]]
    return _drop_seen(ids, scores, keys, index.ntotal, k)


def _exact_index(index: faiss.Index, item_vectors: np.ndarray | None) -> faiss.Index:
    """IndexFlatIP over ``item_vectors`` or, if None, over the vectors ``index`` reconstructs."""
    if item_vectors is None:
        try:
            item_vectors = index.reconstruct_n(0, index.ntotal)
        except RuntimeError as exc:
            raise ValueError(
                "the index cannot reconstruct its vectors; pass item_vectors to search_top_k"
            ) from exc
    x = _as_matrix(item_vectors, "item_vectors")
    if x.shape != (index.ntotal, index.d):
        raise ValueError(f"item_vectors has shape {x.shape}, the index holds {(index.ntotal, index.d)}")
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    return exact


def search_top_k(
    index: faiss.Index,
    user_vectors: np.ndarray,
    k: int,
    seen: SeenItems = None,
    batch_size: int = 4096,
    item_vectors: np.ndarray | None = None,
    fallback: bool = True,
) -> TopK:
    """Top ``k`` unseen items per user by inner product, best first.

    user_vectors: (U, D). seen: per user, row positions to exclude, as a list of arrays or a (U, S)
    array padded with negative values. A user the index returns fewer unseen items for than the catalogue
    holds, up to ``k``, is searched exactly over ``item_vectors`` (default: reconstructed from the index) when
    ``fallback``. stats: ``users``, ``batches``, ``fallback_users``, ``short_users`` (left with fewer than ``k``
    because fewer unseen items exist, or, without ``fallback``, because the index found fewer).
    Raises ``ValueError`` on bad shapes, ``k`` < 1 or ``k`` > the catalogue size.
    """
    users = _as_matrix(user_vectors, "user_vectors")
    if users.shape[1] != index.d:
        raise ValueError(f"user_vectors have dimension {users.shape[1]}, the index {index.d}")
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k={k} must be in 1..{index.ntotal} (the number of indexed items)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    values, offsets = _seen_csr(seen, users.shape[0], index.ntotal)
    available = index.ntotal - np.diff(offsets)  # (U,) unseen items per user
    ids = np.empty((users.shape[0], k), dtype=np.int64)
    scores = np.empty((users.shape[0], k), dtype=np.float32)
    stats = {"users": users.shape[0], "batches": 0, "fallback_users": 0, "short_users": 0}
    exact: faiss.Index | None = None
    for start in range(0, users.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        b_offsets = offsets[start : start + batch_size + 1]
        b_ids, b_scores, found = _search_unseen(index, users[rows], k, values, b_offsets)
        # short of what exists: k, or every unseen item when the user has fewer than k left
        wanted = np.minimum(k, available[rows])
        redo = np.flatnonzero(found < wanted) if fallback else np.zeros(0, np.int64)
        if redo.size:
            exact = exact if exact is not None else _exact_index(index, item_vectors)
            r_offsets = np.concatenate([[0], np.cumsum(np.diff(b_offsets)[redo])])
            r_values = np.concatenate([values[b_offsets[i] : b_offsets[i + 1]] for i in redo])
            b_ids[redo], b_scores[redo], found[redo] = _search_unseen(
                exact, users[rows][redo], k, r_values, r_offsets
            )
        ids[rows], scores[rows] = b_ids, b_scores
        stats["batches"] += 1
        stats["fallback_users"] += int(redo.size)
        stats["short_users"] += int((found < k).sum())
        logger.info(
            "candidates: users %d-%d of %d, %d exact fallbacks",
            start,
            start + len(found) - 1,
            users.shape[0],
            redo.size,
        )
    return TopK(ids, scores, stats)


def ann_recall(
    index: faiss.Index,
    item_vectors: np.ndarray,
    user_vectors_sample: np.ndarray,
    k: int,
    seen_sample: SeenItems = None,
) -> float:
    """Recall@k of ``index`` (no exact fallback) against exact inner-product search on a user sample."""
    truth = _exact_ids(index, item_vectors, user_vectors_sample, k, seen_sample)
    approx = search_top_k(index, user_vectors_sample, k, seen_sample, fallback=False).ids
    return _recall(truth, approx)


def _exact_ids(
    index: faiss.Index, item_vectors: np.ndarray | None, users: np.ndarray, k: int, seen: SeenItems
) -> np.ndarray:
    """(U, k) exact top-k row positions (-1 = none) over ``item_vectors`` (default: what ``index`` holds)."""
    return search_top_k(_exact_index(index, item_vectors), users, k, seen, fallback=False).ids


def _recall(truth: np.ndarray, approx: np.ndarray) -> float:
    """Share of the real (>= 0) ids of truth (U, k) that approx (U, k') holds in the same row."""
    rows = np.arange(truth.shape[0])[:, None]
    n = int(max(truth.max(initial=0), approx.max(initial=0))) + 1
    truth_keys = (rows * n + truth)[truth >= 0]
    approx_keys = (rows * n + approx)[approx >= 0]
    if truth_keys.size == 0:
        raise ValueError("no user in the sample has an unseen item; recall is undefined")
    return float(np.isin(truth_keys, approx_keys).mean())


class Tuning(NamedTuple):
    """What :func:`tune_index` chose: ``parameter`` ("nprobe", "efSearch", or None for an index with nothing to
    tune), its ``value``, the ``recall`` at that value, whether the target was ``reached``, and every
    (value, recall) ``tried``, in the order tried."""

    parameter: str | None
    value: int | None
    recall: float
    reached: bool
    tried: tuple[tuple[int, float], ...]


def _search_parameter(index: faiss.Index, k: int, max_value: int | None) -> tuple[str, list[int]] | None:
    """The search-time knob of an IVF (nprobe: 1, 2, 4, ... nlist) or HNSW index (efSearch: from the first
    power of two >= k, doubling to ``max_value``, default 4096); None for any other index."""
    try:
        name, low, high = "nprobe", 1, faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        if not isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            return None
        name, low, high = "efSearch", 1 << max(k - 1, 0).bit_length(), 4096
    high = min(high, max_value) if max_value is not None else high
    values = [low << i for i in range(64) if low << i < high]
    return name, [*values, high] if high >= low else [low]


def tune_index(
    index: faiss.Index,
    item_vectors: np.ndarray,
    user_sample: np.ndarray,
    k: int,
    target_recall: float,
    seen_sample: SeenItems = None,
    exact_ids: np.ndarray | None = None,
    max_value: int | None = None,
) -> Tuning:
    """Raise nprobe (IVF) or efSearch (HNSW) step by step, doubling, until recall@k against exact search on
    ``user_sample`` reaches ``target_recall``, then bisect between the last value that missed and the first
    that reached (to 1/8 of the former); the index is left set to the SMALLEST value tried that reaches it.

    ``exact_ids`` (S, k) row positions (-1 = none) of the exact top-k of the sample with ``seen_sample``
    excluded, e.g. from :func:`recsys.topk.top_k_blocked`; default an exact FAISS search over
    ``item_vectors``. If no value reaches the target, the largest tried is kept and a warning logged. An index
    with no such parameter (Flat) is measured once and left as is. Raises ``ValueError`` on a target outside
    (0, 1] or an ``exact_ids`` of the wrong shape.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    users = _as_matrix(user_sample, "user_sample")
    truth = exact_ids if exact_ids is not None else _exact_ids(index, item_vectors, users, k, seen_sample)
    if truth.shape != (users.shape[0], k):
        raise ValueError(f"exact_ids has shape {truth.shape}, expected {(users.shape[0], k)}")
    knob = _search_parameter(index, k, max_value)
    if knob is None:
        recall = _recall(truth, search_top_k(index, users, k, seen_sample, fallback=False).ids)
        return Tuning(None, None, recall, recall >= target_recall, ())
    name, values = knob
    tried: dict[int, float] = {}

    def reaches(value: int) -> bool:
        faiss.ParameterSpace().set_index_parameter(index, name, value)
        tried[value] = _recall(truth, search_top_k(index, users, k, seen_sample, fallback=False).ids)
        logger.info("tune %s=%d: recall@%d %.4f (target %.4f)", name, value, k, tried[value], target_recall)
        return tried[value] >= target_recall

    missed: int | None = None
    for value in values:
        if reaches(value):
            best = value if missed is None else _bisect(reaches, missed, value)
            faiss.ParameterSpace().set_index_parameter(index, name, best)
            return Tuning(name, best, tried[best], True, tuple(tried.items()))
        missed = value
    logger.warning("%s up to %d reaches recall@%d %.4f < target %.4f; keeping %s=%d", name, values[-1], k,
                   tried[values[-1]], target_recall, name, values[-1])
    return Tuning(name, values[-1], tried[values[-1]], False, tuple(tried.items()))


def _bisect(reaches: Callable[[int], bool], low: int, high: int) -> int:
    """Smallest value in (low, high] that ``reaches`` (known: low misses, high reaches), to within 1/8 of low:
    doubling overshoots by up to 2x, and the search cost grows with the value."""
    while high - low > max(1, low // 8):
        mid = (low + high) // 2
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return high
