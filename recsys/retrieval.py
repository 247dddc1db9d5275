"""Top-K candidate retrieval with FAISS (the only module that imports it).

Scores are inner products of user and item vectors. Ids returned here are ROW POSITIONS in the
``item_vectors`` the index was built from; the caller maps them to item indices and external ids.
Approximate indexes are checked against exact search (:func:`ann_recall`), and a user the approximate
search leaves short of ``k`` unseen items is answered by exact search instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import faiss
import numpy as np
import torch

from recsys.data import RaggedItems
from recsys.topk import top_k_blocked

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


class IndexSpecError(ValueError):
    """A factory string FAISS rejects for this dimension, or a search parameter the index does not have."""


def empty_index(factory: str, dim: int, nprobe: int | None = None, ef_search: int | None = None) -> faiss.Index:
    """The empty inner-product index ``factory`` of dimension ``dim`` with its search parameters set: what
    :func:`build_index` trains and fills, and a check of the settings before any vector exists (the config's).
    Raises :class:`IndexSpecError` naming the string or the parameter."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # "Error in <C++ signature> at <file>:<line>: [Error: '<condition>' failed: ]<what>": keep <what>
        message = re.sub(r"^Error in .*? at \S+:\d+: (?:Error: '.*?' failed: )?", "", str(exc).strip())
        raise IndexSpecError(f"FAISS rejects the index factory string {factory!r} for vectors of dimension {dim}"
                             f"{': ' + message if message else ''}") from exc
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError as exc:
            raise IndexSpecError(f"index {factory!r} has no search parameter {name!r} (got {value}): nprobe is for "
                                 "IVF indexes, efSearch (ef_search) for HNSW") from exc
    return index


def build_index(
    item_vectors: np.ndarray,
    factory: str = "Flat",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> faiss.Index:
    """Inner-product index over ``item_vectors`` (I, D) described by a FAISS factory string.

    Trains the index on the vectors when it needs training (IVF, PQ). ``nprobe`` / ``ef_search`` set the
    search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW). Raises ``ValueError`` naming the
    factory string when FAISS rejects it or a parameter (:class:`IndexSpecError`), and :class:`IndexBuildError`
    (a ``ValueError``) when the index cannot be trained or filled with these vectors (e.g. fewer vectors than IVF
    lists).
    """
    x = _as_matrix(item_vectors, "item_vectors")
    index = empty_index(factory, x.shape[1], nprobe, ef_search)
    try:
        if not index.is_trained:
            index.train(x)
        index.add(x)
    except RuntimeError as exc:
        raise IndexBuildError(f"cannot build FAISS index {factory!r} over {x.shape[0]} vectors: {exc}") from exc
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


WIDEN_CAP = 1024  # at most this many results searched beyond k+1 for a user's seen items


def _search_unseen(
    index: faiss.Index, users: np.ndarray, k: int, values: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row searched for k + (its own number of seen items rounded up to a power of two, at most
    :data:`WIDEN_CAP`) results, seen items then dropped (see _drop_seen); rows of one width in one search.

    The width depends on the row's own history only, never on the other users of its batch: an index whose
    leading results change with the number of results asked for (a ``Refine`` index re-ranks more candidates,
    HNSW searches max(efSearch, k) wide) gives a user the same list in any batch, shard or recall sample (one
    heavy user used to widen its whole batch's search: 48 of 50 lists changed with IVF,PQ,Refine(Flat)). The cap
    keeps a heavy user's search bounded (40,000 seen items made a 4,096-user batch 6.5 GB); a row it leaves
    short is searched exactly."""
    n_seen = np.diff(offsets)
    widen = np.where(n_seen > 0, 2 ** np.ceil(np.log2(np.maximum(n_seen, 1))), 0).astype(np.int64)
    widen = np.minimum(widen, WIDEN_CAP)
    out_ids = np.full((users.shape[0], k), -1, dtype=np.int64)
    out_scores = np.full((users.shape[0], k), -np.inf, dtype=np.float32)
    found = np.zeros(users.shape[0], dtype=np.int64)
    for width in np.unique(widen):
        rows = np.flatnonzero(widen == width)
        scores, ids = index.search(users[rows], int(min(index.ntotal, k + width)))  # (R, kk) each
        lengths = n_seen[rows]
        # positions in ``values`` of these rows' seen items, row after row
        starts = np.repeat(offsets[rows] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        seen = values[starts + np.arange(lengths.sum())]
        keys = np.repeat(np.arange(rows.size), lengths) * index.ntotal + seen  # sorted: row, then item
        out_ids[rows], out_scores[rows], found[rows] = _drop_seen(ids, scores, keys, index.ntotal, k)
    return out_ids, out_scores, found


def _exact_distances(index: faiss.Index) -> bool:
    """Whether ``index`` returns exact inner products, best first (it stores the vectors as they are); False
    for anything else, a wrapper such as a Python proxy included (its results are scored again)."""
    try:
        inner = faiss.downcast_index(index)
    except TypeError:
        return False
    return isinstance(inner, faiss.IndexFlat | faiss.IndexIVFFlat | faiss.IndexHNSWFlat)


def _rescore(users: np.ndarray, items: np.ndarray, ids: np.ndarray, scores: np.ndarray, exact: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """The found ``ids`` (B, k') (-1 = none) with their exact ``user · item`` scores, each row sorted by (score
    descending, id ascending) as the evaluation orders items.

    A compressed index's distances are approximate (PQ: errors of several units on scores near 17): they are
    computed again unless ``exact`` (``scores`` are the index's exact ones, best first; then only rows with a
    tie are re-sorted, as an index returns tied items in an order that depends on the search)."""
    real = ids >= 0
    if exact:
        scores = np.where(real, scores, -np.inf).astype(np.float32)
        rows = np.flatnonzero(((scores[:, 1:] == scores[:, :-1]) & real[:, 1:]).any(axis=1))
    else:
        scores = np.einsum("bd,bkd->bk", users, items[np.maximum(ids, 0)], dtype=np.float32)
        scores = np.where(real, scores, -np.inf).astype(np.float32)
        rows = np.arange(len(ids))
    if rows.size:
        order = np.lexsort((np.where(real[rows], ids[rows], np.iinfo(np.int64).max), -scores[rows]), axis=1)
        ids, scores = ids.copy(), scores.copy()
        ids[rows], scores[rows] = np.take_along_axis(ids[rows], order, 1), np.take_along_axis(scores[rows], order, 1)
    return ids, scores


def _exact_top_k(items: np.ndarray, users: np.ndarray, k: int, values: np.ndarray, offsets: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` unseen items of ``users`` by (score desc, id asc) over ``items`` in item blocks, seen items
    masked (:func:`recsys.topk.top_k_blocked`, the evaluation's scorer): no widening, however long a history."""
    seen = RaggedItems(torch.from_numpy(values[offsets[0] : offsets[-1]].astype(np.int32)),
                       torch.from_numpy(offsets - offsets[0]))
    found = top_k_blocked(torch.from_numpy(users), torch.from_numpy(items), k, seen)
    return found.ids.numpy(), found.scores.numpy()


def _exact_vectors(index: faiss.Index, item_vectors: np.ndarray | None) -> np.ndarray:
    """``item_vectors`` (I, D) checked against ``index`` or, if None, the vectors ``index`` reconstructs."""
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
    return x


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
    array padded with negative values. With ``fallback`` (the candidates job), the index's results are
    re-scored exactly over ``item_vectors`` (default: reconstructed from the index) and ordered by (score
    descending, id ascending), the evaluation's order; a user the index leaves short of what exists (k, or
    fewer unseen items), or whose k-th score ties with the next result (the index may hold back tied items of
    smaller id), is answered by exact blocked search (:func:`recsys.topk.top_k_blocked`). So with an exact
    index a user's list does not depend on the other users of its batch. Without ``fallback`` the index's own
    results and distances are returned (what :func:`ann_recall` measures).
    stats: ``users``, ``batches``, ``fallback_users``, ``short_users`` (left with fewer than ``k`` because
    fewer unseen items exist, or, without ``fallback``, because the index found fewer).
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
    items = _exact_vectors(index, item_vectors) if fallback else None
    exact_distances = _exact_distances(index)
    redone: list[np.ndarray] = []
    for start in range(0, users.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        b_offsets = offsets[start : start + batch_size + 1]
        if items is None:
            b_ids, b_scores, found = _search_unseen(index, users[rows], k, values, b_offsets)
            redo = np.zeros(0, np.int64)
        else:
            # one result beyond k, to see whether the k-th score is tied with what the index held back
            wide = min(k + 1, index.ntotal)
            w_ids, w_scores, found = _search_unseen(index, users[rows], wide, values, b_offsets)
            w_ids, w_scores = _rescore(users[rows], items, w_ids, w_scores, exact_distances)
            b_ids, b_scores = w_ids[:, :k], w_scores[:, :k]
            # short of what exists (k + 1 to check the tie, or every unseen item when fewer), or tied at k
            tied = (found > k) & (w_scores[:, k - 1] == w_scores[:, wide - 1]) if wide > k else False
            redo = np.flatnonzero((found < np.minimum(wide, available[rows])) | tied)
            redone.append(start + redo)  # answered exactly after the loop, all at once
            found = (b_ids >= 0).sum(axis=1)
            found[redo] = k  # counted short (or not) once answered exactly
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
    redo = np.concatenate(redone) if redone else np.zeros(0, np.int64)
    if redo.size:  # one blocked pass over the items for every user the index left short or tied
        r_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[redo])])
        r_values = np.concatenate([values[offsets[i] : offsets[i + 1]] for i in redo])
        ids[redo], scores[redo] = _exact_top_k(items, users[redo], k, r_values, r_offsets)
        stats["short_users"] += int((ids[redo] < 0).any(axis=1).sum())
    return TopK(ids, scores, stats)


def ann_recall(
    index: faiss.Index,
    item_vectors: np.ndarray,
    user_vectors_sample: np.ndarray,
    k: int,
    seen_sample: SeenItems = None,
) -> float | None:
    """Recall@k of the lists :func:`search_top_k` publishes from ``index`` (its exact fallback included: a row the
    index leaves short, e.g. of a user whose best items are mostly seen, is answered exactly) against exact
    inner-product search on a user sample; None when no user of the sample has an unseen item (nothing to
    recall: e.g. an allow list they all saw)."""
    truth = _exact_ids(index, item_vectors, user_vectors_sample, k, seen_sample)
    return recall_at_k(truth, _published_ids(index, item_vectors, user_vectors_sample, k, seen_sample))


def _published_ids(index: faiss.Index, item_vectors: np.ndarray, users: np.ndarray, k: int, seen: SeenItems
                   ) -> np.ndarray:
    """(U, k) row positions of what the candidates job publishes: :func:`search_top_k` with its fallback."""
    return search_top_k(index, users, k, seen, item_vectors=item_vectors).ids


def exact_search(item_vectors: np.ndarray, users: np.ndarray, k: int, seen: SeenItems = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(U, k) exact top-k row positions of ``item_vectors`` (-1 = none) and their float32 scores, by (score
    descending, id ascending), seen items excluded however many a user has: the blocked exact scorer, not a Flat
    search, whose widening stops at :data:`WIDEN_CAP` (a user whose best items are 1,100 seen ones had no "exact"
    unseen item: tuning and the ``min_recall`` gate were skipped)."""
    users = _as_matrix(users, "user_vectors")
    values, offsets = _seen_csr(seen, users.shape[0], len(item_vectors))
    return _exact_top_k(item_vectors, users, k, values, offsets)


def _exact_ids(
    index: faiss.Index, item_vectors: np.ndarray | None, users: np.ndarray, k: int, seen: SeenItems
) -> np.ndarray:
    """(U, k) :func:`exact_search` row positions over ``item_vectors`` (default: what ``index`` holds)."""
    return exact_search(_exact_vectors(index, item_vectors), users, k, seen)[0]


def recall_at_k(truth: np.ndarray, approx: np.ndarray) -> float | None:
    """Share of the real (>= 0) ids of truth (U, k) that approx (U, k') holds in the same row; None if truth
    holds none."""
    rows = np.arange(truth.shape[0])[:, None]
    n = int(max(truth.max(initial=0), approx.max(initial=0))) + 1
    truth_keys = (rows * n + truth)[truth >= 0]
    approx_keys = (rows * n + approx)[approx >= 0]
    if truth_keys.size == 0:
        return None
    return float(np.isin(truth_keys, approx_keys).mean())


class Tuning(NamedTuple):
    """What :func:`tune_index` chose: ``parameter`` ("nprobe", "efSearch", or None for an index with nothing to
    tune, or when no user of the sample has an unseen item), its ``value``, the ``recall`` at that value (None
    when there is nothing to recall), whether the target was ``reached``, and every
    (value, recall) ``tried``, in the order tried."""

    parameter: str | None
    value: int | None
    recall: float | None
    reached: bool
    tried: tuple[tuple[int, float], ...]


def _innermost(index: faiss.Index) -> faiss.Index:
    """The index a transform (``RR32,HNSW16``: IndexPreTransform) or a refinement (``HNSW16,Refine(Flat)``:
    IndexRefine) wraps, downcast; ParameterSpace sets its search parameters through the wrappers."""
    inner = faiss.downcast_index(index)
    while True:
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexRefine):
            inner = faiss.downcast_index(inner.base_index)
        else:
            return inner


def _search_parameter(index: faiss.Index, k: int, max_value: int | None) -> tuple[str, list[int]] | None:
    """The search-time knob of an IVF (nprobe: 1, 2, 4, ... nlist) or HNSW index (efSearch: from the first
    power of two >= k, doubling to ``max_value``, default 4096); None for any other index."""
    try:
        name, low, high = "nprobe", 1, faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        if not isinstance(_innermost(index), faiss.IndexHNSW):
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
    publish: Callable[[], np.ndarray] | None = None,
) -> Tuning:
    """Raise nprobe (IVF) or efSearch (HNSW) step by step, doubling, until the recall@k of the published lists
    (:func:`ann_recall`'s: the index with its exact fallback) against exact search on ``user_sample`` reaches
    ``target_recall``, then bisect between the last value that missed and the first
    that reached (to 1/8 of the former); the index is left set to the SMALLEST value tried that reaches it.

    ``exact_ids`` (S, k) row positions (-1 = none) of the exact top-k of the sample with ``seen_sample``
    excluded, e.g. from :func:`recsys.topk.top_k_blocked`; default the same over ``item_vectors``. If no value
    reaches the target, the largest tried is kept and a warning logged. An index with no such parameter (Flat)
    is measured once and left as is. ``publish`` (with ``exact_ids``): the (S, k) lists a job publishes from
    the index as it is now set, when they are more than :func:`search_top_k`'s (the candidates job's repeat
    bonus); ``exact_ids`` is then their exact reference. Raises ``ValueError`` on a target outside
    (0, 1] or an ``exact_ids`` of the wrong shape.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    users = _as_matrix(user_sample, "user_sample")
    truth = exact_ids if exact_ids is not None else _exact_ids(index, item_vectors, users, k, seen_sample)
    if truth.shape != (users.shape[0], k):
        raise ValueError(f"exact_ids has shape {truth.shape}, expected {(users.shape[0], k)}")
    if not (truth >= 0).any():  # every sampled user saw every item: nothing to tune on, the index is left as is
        logger.warning("tune: no user of the %d sampled has an unseen item; the index is left untuned", len(users))
        return Tuning(None, None, None, False, ())
    if publish is None:
        def publish() -> np.ndarray:
            return _published_ids(index, item_vectors, users, k, seen_sample)
    knob = _search_parameter(index, k, max_value)
    if knob is None:
        recall = recall_at_k(truth, publish())
        return Tuning(None, None, recall, recall >= target_recall, ())
    name, values = knob
    tried: dict[int, float] = {}

    def reaches(value: int) -> bool:
        faiss.ParameterSpace().set_index_parameter(index, name, value)
        tried[value] = recall_at_k(truth, publish())
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
