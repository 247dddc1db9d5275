"""Exact top-K by inner product in user blocks x item blocks with a running merge (torch, any device).

Memory is O(user_block * item_block) for the scores plus the (U, k) result, never the (U, I) score matrix
(targets' own scores: GEMMs of TARGET_CHUNK users, O(user_block * TARGET_CHUNK * targets)).
Order: score descending, then item position ascending (``torch.topk`` orders ties arbitrarily; rows tied at
the k-th value are redone with a stable sort). The selection is a deterministic function of the fp32 scores,
so ids, scores and ranks do not depend on the block sizes as long as the GEMM gives each (user, item) pair the
same fp32 score whatever the block shape. Scores are exact, hence identical, for integer-valued vectors; for
float vectors MKL gives identical scores once both GEMM sides have >= 4 (users) and >= 12 (items) rows, so
every GEMM here is padded to >= MIN_GEMM rows (tested against a full-matrix oracle). Another BLAS or GPU
kernel might round a score's last bit by shape, which could only swap items scored within an ulp or so.

Item ids here are ROW POSITIONS in ``item_vectors`` (0-based). Seen items are excluded from the top-K and
from the ranking; a user's targets never are (as ``recsys.metrics.exclusion_mask(..., keep=targets)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recsys.data import RaggedItems

NEG_INF = float("-inf")
CHUNK = 64  # items per chunk whose maximum decides whether the chunk can enter a user's running top-K
MIN_GEMM = 16  # both sides of every score GEMM are padded to at least this many rows (see _scores)
TARGET_CHUNK = 64  # users per GEMM of their targets' scores (_Ranks): (64, 64 * M), whatever the user block
TIED_BUDGET = 1 << 22  # tied entries (16 bytes each) up to which _first_tied resolves a top-k boundary
WORD_GROUP = 128  # int64 words summed per byte lane in count_at_least (a lane holds up to 255)


class BlockedTopK(NamedTuple):
    """ids (U, k) int64 item positions, best first, -1 where a user has fewer than k unseen items;
    scores (U, k) float32, -inf where ids is -1; ranks (U, M) int64 pessimistic 0-based rank of each target,
    -1 for a padding target (< 0) or a repeat of an earlier one; None when no targets were given."""

    ids: torch.Tensor
    scores: torch.Tensor
    ranks: torch.Tensor | None


def select_top_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row by (score descending, id ascending), best first; -inf entries are no candidates.

    scores (B, N) float, ids (B, N) int64 (or broadcastable to it), k <= N. Returns scores (B, k) and
    ids (B, k), id -1 where the row has fewer than k entries above -inf.
    """
    ascending = ids.ndim == 1 and bool((ids[1:] > ids[:-1]).all())  # one id row, in column order
    top_s, top_i = _order(*_select(scores, ids.expand_as(scores), k, ascending))
    return top_s, top_i.masked_fill(top_s == NEG_INF, -1)


def _select(
    scores: torch.Tensor, ids: torch.Tensor, k: int, ascending: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The right SET of k per row (B, N) -> (B, k), in no particular order.

    ``torch.topk`` breaks ties arbitrarily, so rows whose k-th value is tied with an entry left out are
    redone, smallest ids first among the tied (rare unless scores tie; ties at -inf need no care: -inf is no
    candidate). Ids must be distinct within a row (every caller's are); ``ascending``: ids (one row, broadcast)
    increase along the row, so the smallest tied ids are the first tied columns (:func:`_first_tied`, when the
    tied entries number at most TIED_BUDGET), else :func:`_select_tied`.
    """
    top_s, pos = scores.topk(k, dim=1, sorted=False)  # (B, k)
    kth = top_s.amin(1, keepdim=True)  # (B, 1)
    at_least = count_at_least(scores, kth)  # (B,) entries >= the k-th score
    tied_out = (at_least > k) & (kth.squeeze(1) > NEG_INF)  # (B,) ambiguous boundary
    top_i = ids.gather(1, pos)  # (B, k)
    rows = tied_out.nonzero().squeeze(1)  # (R,)
    if not rows.numel():
        return top_s, top_i
    n_tied = int(at_least[rows].sum()) - int((top_s[rows] > kth[rows]).sum())  # tied entries in those rows
    if ascending and n_tied <= TIED_BUDGET:
        top_s[rows], top_i[rows] = _first_tied(scores, ids[0], rows, top_s[rows], top_i[rows], kth[rows])
    else:
        top_s[rows], top_i[rows] = _select_tied(scores[rows], ids[rows], kth[rows], k)
    return top_s, top_i


def _first_tied(
    scores: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
    top_s: torch.Tensor,
    top_i: torch.Tensor,
    kth: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_select_tied` of ``rows`` (R,) of scores (B, N) whose ids ``ids`` (N,) ascend along the row.

    The entries above a row's k-th score ``kth`` (R, 1) are all in torch.topk's result ``top_s``, ``top_i``
    (R, k); the tied ones to take are the first ``need`` columns equal to ``kth``: the tied entries' (row,
    column) pairs come out of ``nonzero`` in row-major order, so each row's first ``need`` are its smallest
    ids. One comparison and one scan of the R rows, memory O(R x N / 8 + tied entries): the caller bounds them
    (TIED_BUDGET), e.g. an item-kNN batch whose boundaries are scattered ties of small similarity sums.
    """
    n_rows, k = top_s.shape
    above = top_s > kth  # (R, k)
    need = k - above.sum(1)  # (R,) tied entries to take, 1..k
    j, c = (scores.index_select(0, rows) == kth).nonzero(as_tuple=True)  # (T,) each, columns ascending in a row
    counts = torch.bincount(j, minlength=n_rows)  # (R,)
    slot = torch.arange(j.numel(), device=j.device) - (torch.cumsum(counts, 0) - counts)[j]  # (T,) rank in row
    take = slot < need[j]  # (T,) exactly need[j] per row
    j, c = j[take], c[take]  # row-major, need[j] per row
    # The not-above slots of each row (need of them, row-major too) take the row's chosen tied entries in order.
    free_r, free_c = (~above).nonzero(as_tuple=True)  # (sum need,) each
    top_s, top_i = top_s.clone(), top_i.clone()
    top_s[free_r, free_c] = kth[j, 0]
    top_i[free_r, free_c] = ids[c]
    return top_s, top_i


def _select_tied(
    scores: torch.Tensor, ids: torch.Tensor, kth: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of rows (R, N) whose k-th score ``kth`` (R, 1) is shared by entries left out: every entry above
    it, then the entries equal to it with the smallest ids (ids are distinct within a row), in row order.

    No sort of the rows (a catalogue with many equal scores, e.g. popularity, has such a boundary in every row):
    the smallest tied ids come from a top-k over the ids, and exactly k entries per row are then gathered."""
    above = scores > kth  # (R, N)
    tied = scores == kth  # (R, N)
    need = k - above.sum(1, keepdim=True)  # (R, 1) tied entries to take, 1..k
    tied_ids = ids.masked_fill(~tied, torch.iinfo(ids.dtype).max)  # (R, N)
    smallest = tied_ids.topk(int(need.max()), dim=1, largest=False).values  # (R, max need) ascending
    last_id = smallest.gather(1, need - 1)  # (R, 1) the largest id taken
    take = above | (tied & (ids <= last_id))  # (R, N) exactly k per row
    cols = take.nonzero()[:, 1].view(-1, k)  # (R, k)
    return scores.gather(1, cols), ids.gather(1, cols)


def _order(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row (B, N) by (score desc, id asc): a stable sort by id, then a stable sort by score."""
    by_id = torch.argsort(ids, dim=1, stable=True)  # (B, N)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    best = torch.argsort(scores, dim=1, descending=True, stable=True)  # (B, N)
    return scores.gather(1, best), ids.gather(1, best)


def top_k_blocked(
    user_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    k: int,
    seen: RaggedItems | None = None,
    targets: torch.Tensor | None = None,
    user_block_size: int = 1024,
    item_block_size: int = 16384,
    device: torch.device | str | None = None,
) -> BlockedTopK:
    """Top ``k`` unseen items per user by inner product, and optionally each target's pessimistic rank.

    user_vectors (U, D), item_vectors (I, D): finite, cast to float32 and moved to ``device`` (default: the
    user vectors' device) block by block. seen: U rows of item positions (duplicates allowed). targets (U, M)
    int item positions, < 0 = padding. A target's rank counts the unseen non-target items scoring >= it plus
    the other targets scoring above it or tied with a smaller position (``recsys.metrics.target_ranks``).
    Results are on the CPU. Raises ``ValueError`` on bad shapes, sizes, positions or non-finite vectors.
    """
    _check_inputs(user_vectors, item_vectors, k, seen, targets, user_block_size, item_block_size)
    device = torch.device(device) if device is not None else user_vectors.device
    items = item_vectors.to(device=device, dtype=torch.float32).contiguous()  # (I, D)
    n_users = user_vectors.shape[0]
    ids = torch.empty(n_users, k, dtype=torch.long)
    scores = torch.empty(n_users, k, dtype=torch.float32)
    ranks = None if targets is None else torch.empty(targets.shape, dtype=torch.long)
    for start in range(0, n_users, user_block_size):
        stop = min(start + user_block_size, n_users)
        users = user_vectors[start:stop].to(device=device, dtype=torch.float32)  # (B, D)
        block_seen = _block_seen(seen, start, stop, device)
        block_targets = None if targets is None else targets[start:stop].to(device).long()  # (B, M)
        b_scores, b_ids, b_ranks = _user_block(users, items, k, block_seen, block_targets, item_block_size)
        scores[start:stop], ids[start:stop] = b_scores.cpu(), b_ids.cpu()
        if ranks is not None and b_ranks is not None:
            ranks[start:stop] = b_ranks.cpu()
    return BlockedTopK(ids, scores, ranks)


def _check_inputs(
    users: torch.Tensor,
    items: torch.Tensor,
    k: int,
    seen: RaggedItems | None,
    targets: torch.Tensor | None,
    user_block_size: int,
    item_block_size: int,
) -> None:
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1] or items.shape[0] == 0:
        raise ValueError(f"user_vectors (U, D) and item_vectors (I, D) must share D and I >= 1, got "
                         f"{tuple(users.shape)} and {tuple(items.shape)}")
    if not 1 <= k <= items.shape[0]:
        raise ValueError(f"k={k} must be in 1..{items.shape[0]} (the number of item vectors)")
    if user_block_size < 1 or item_block_size < 1:
        raise ValueError(f"block sizes must be >= 1, got users {user_block_size}, items {item_block_size}")
    for name, x in (("user_vectors", users), ("item_vectors", items)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
    if seen is not None:
        if len(seen.lengths) != users.shape[0]:
            raise ValueError(f"seen has {len(seen.lengths)} rows but there are {users.shape[0]} user vectors")
        if seen.values.numel() and not 0 <= int(seen.values.min()) <= int(seen.values.max()) < items.shape[0]:
            raise ValueError(f"seen holds positions outside 0..{items.shape[0] - 1}")
    if targets is not None:
        if targets.ndim != 2 or targets.shape[0] != users.shape[0]:
            raise ValueError(f"targets must be (U, M) with U={users.shape[0]}, got {tuple(targets.shape)}")
        if targets.numel() and int(targets.max()) >= items.shape[0]:
            raise ValueError(f"targets hold position {int(targets.max())} >= {items.shape[0]} items")


def _block_seen(
    seen: RaggedItems | None, start: int, stop: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, cols) of the seen items of users start..stop-1, rows relative to ``start``."""
    if seen is None:
        return None
    lo, hi = int(seen.offsets[start]), int(seen.offsets[stop])
    rows = torch.repeat_interleave(torch.arange(stop - start), seen.lengths[start:stop])  # (S,)
    return rows.to(device), seen.values[lo:hi].to(device).long()


def _by_item_block(
    rows: torch.Tensor, cols: torch.Tensor, block: int, n_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(rows, cols) sorted by item block, with the boundaries of each block's slice (n_blocks + 1)."""
    order = torch.argsort(cols // block, stable=True)
    counts = torch.bincount(cols // block, minlength=n_blocks)
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    return rows[order], cols[order], bounds


def _scores(users: torch.Tensor, items: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """users (B, D) @ items (W, D).T -> contiguous (B, W) fp32 scores, written into ``buffer`` (flat) if given.

    Both sides are zero-padded to at least MIN_GEMM rows: MKL multiplies very thin matrices with kernels that
    sum the D products in another order, which would make a score's last bit depend on the block shape.
    Reusing one buffer saves the page faults of a fresh (B, W) allocation per block (~25% of the GEMM on CPU).
    """
    b, w = users.shape[0], items.shape[0]
    if b < MIN_GEMM or w < MIN_GEMM:
        users = torch.nn.functional.pad(users, (0, 0, 0, max(MIN_GEMM - b, 0)))  # (max(B, 16), D)
        items = torch.nn.functional.pad(items, (0, 0, 0, max(MIN_GEMM - w, 0)))  # (max(W, 16), D)
        return (users @ items.T)[:b, :w].contiguous()  # (B, W)
    if buffer is None:
        return users @ items.T  # (B, W)
    return torch.mm(users, items.T, out=buffer[: b * w].view(b, w))  # (B, W)


def count_at_least(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(B,) int64 number of entries of each row of scores (B, W) that are >= thresholds (B, 1).

    The boolean mask is summed as int64 words, 8 entries per word; a group of WORD_GROUP words puts at most
    WORD_GROUP ones in each byte lane, so no carry crosses lanes, and the lanes are summed last. Several times
    faster on CPU than summing the bools, which first copies them to a wider integer type.
    """
    b, w = scores.shape
    body = w - w % (8 * WORD_GROUP)
    count = (scores[:, body:] >= thresholds).sum(1)  # (B,) the columns past the last full group
    if body:
        mask = scores[:, :body] >= thresholds  # (B, body) bool
        words = mask.view(torch.int64).reshape(b, -1, WORD_GROUP).sum(2)  # (B, body / 1024) 8 lanes each
        count += words.view(torch.uint8).reshape(b, -1).sum(1)
    return count


def repeated_targets(targets: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: the entry repeats an earlier entry of its row. One stable sort per row (O(B·M log M)), not a
    (B, M, M) comparison: a user with 3,000 targets under a time split would make that 9e9 booleans a batch."""
    if targets.shape[1] == 1:
        return torch.zeros_like(targets, dtype=torch.bool)
    values, order = targets.sort(dim=1, stable=True)  # equal entries keep their column order: the first stays
    repeat = torch.zeros_like(values, dtype=torch.bool)
    repeat[:, 1:] = values[:, 1:] == values[:, :-1]
    return torch.empty_like(repeat).scatter_(1, order, repeat)


def targets_above(t_scores: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, M) for each target the number of the row's OTHER ``valid`` targets ranked above it: a higher score,
    or an equal one and a smaller item index (``t_scores`` without NaN). That is its position in the row's
    targets sorted by (score desc, index asc), the invalid ones last: two stable sorts, O(B·M log M) time and
    O(B·M) memory instead of (B, M, M) comparisons."""
    m = targets.shape[1]
    if m == 1:
        return torch.zeros_like(targets, dtype=torch.long)
    by_index = torch.where(valid, targets.long(), torch.iinfo(torch.long).max).argsort(dim=1, stable=True)
    scores = torch.where(valid, t_scores, float("-inf")).gather(1, by_index)  # invalid: after every valid one
    order = by_index.gather(1, scores.sort(dim=1, descending=True, stable=True)[1])  # (B, M) columns, best first
    positions = torch.arange(m, device=targets.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def count_column(scores: torch.Tensor, thresholds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """:func:`count_at_least` for one target column, needed only on ``rows`` (B,) bool (the rows whose target in
    that column is real; other rows get 0). With several targets per user (a time split) the lists are padded to
    the batch's longest, so most rows of a column can be padding (one user with 1,000 targets): those rows are
    then gathered first, costing their own width and not a pass over the batch."""
    picked = rows.nonzero().squeeze(1)  # (P,)
    if 2 * picked.numel() > rows.numel():
        return count_at_least(scores, thresholds)
    out = torch.zeros(rows.shape[0], dtype=torch.long, device=scores.device)
    if picked.numel():
        out[picked] = count_at_least(scores[picked], thresholds[picked])
    return out


class _Ranks:
    """Running 'competitors scoring >= the target' counts of one user block's targets."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> None:
        m = targets.shape[1]
        self.valid = (targets >= 0) & ~repeated_targets(targets)  # (B, M)
        self.targets = targets.clamp(min=0)  # (B, M)
        # A GEMM like the item blocks' (a per-row dot product sums in another order, so a target could miss
        # its own score in its block by a bit), of which each user keeps the columns of its own targets; in
        # chunks of TARGET_CHUNK users, so that it is (c, c * M), not (B, B * M): O(B) memory, not O(B^2).
        b, flat = users.shape[0], items[self.targets.reshape(-1)]  # (B * M, D)
        parts = []
        for start in range(0, b, TARGET_CHUNK):
            c = min(TARGET_CHUNK, b - start)
            own = torch.arange(c, device=users.device)  # (c,)
            chunk = _scores(users[start : start + c], flat[start * m : (start + c) * m])  # (c, c * M)
            parts.append(chunk.view(c, c, m)[own, own])  # (c, M)
        self.scores = torch.cat(parts) if parts else users.new_zeros(0, m)  # (B, M)
        self.ahead = torch.zeros_like(self.targets)  # (B, M)
        rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)
        self.rows, self.cols = rows[self.valid], self.targets[self.valid]  # (T,) each

    def count(self, block: torch.Tensor) -> None:
        """block (B, W): scores with seen and target columns already at -inf."""
        m = self.targets.shape[1]
        for j in range(m):  # one target a user: every row counts (no host synchronisation)
            column = self.scores[:, j : j + 1]
            self.ahead[:, j] += (count_at_least(block, column) if m == 1
                                 else count_column(block, column, self.valid[:, j]))

    def result(self) -> torch.Tensor:
        """(B, M) ranks: competitors ahead plus the other targets above (ties: smaller position first)."""
        ranks = self.ahead + targets_above(self.scores, self.targets, self.valid)
        return torch.where(self.valid, ranks, torch.full_like(ranks, -1))


def _user_block(
    users: torch.Tensor,
    items: torch.Tensor,
    k: int,
    seen: tuple[torch.Tensor, torch.Tensor] | None,
    targets: torch.Tensor | None,
    item_block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scores (B, k), ids (B, k) and ranks (B, M) or None for one block of users."""
    n_items, b = items.shape[0], users.shape[0]
    n_blocks = -(-n_items // item_block_size)
    empty = torch.zeros(0, dtype=torch.long, device=users.device)
    s_rows, s_cols, s_bounds = _by_item_block(*(seen or (empty, empty)), item_block_size, n_blocks)
    ranks = _Ranks(users, items, targets) if targets is not None else None
    t_rows, t_cols, t_bounds = _by_item_block(
        *((ranks.rows, ranks.cols) if ranks else (empty, empty)), item_block_size, n_blocks
    )
    run_s = torch.full((b, k), NEG_INF, device=users.device)  # (B, k) running top-k, any order
    run_i = torch.full((b, k), -1, dtype=torch.long, device=users.device)  # (B, k)
    buffer = torch.empty(b * min(item_block_size, n_items), device=users.device)  # reused for every block
    for blk, i0 in enumerate(range(0, n_items, item_block_size)):
        scores = _scores(users, items[i0 : i0 + item_block_size], buffer)  # (B, W)
        sr, sc = s_rows[s_bounds[blk] : s_bounds[blk + 1]], s_cols[s_bounds[blk] : s_bounds[blk + 1]] - i0
        tr, tc = t_rows[t_bounds[blk] : t_bounds[blk + 1]], t_cols[t_bounds[blk] : t_bounds[blk + 1]] - i0
        kept = scores[tr, tc]  # (T,) targets are never excluded, even when seen
        scores[sr, sc] = NEG_INF
        if ranks is not None:
            scores[tr, tc] = NEG_INF
            ranks.count(scores)
        scores[tr, tc] = kept
        run_s, run_i = _merge(run_s, run_i, scores, i0, k)
    run_s, run_i = _order(run_s, run_i)
    return run_s, run_i.masked_fill(run_s == NEG_INF, -1), ranks.result() if ranks else None


def _merge(
    run_s: torch.Tensor, run_i: torch.Tensor, scores: torch.Tensor, i0: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k (B, k) merged with one item block's scores (B, W) whose ids are i0 .. i0 + W - 1.

    Only chunks of CHUNK items whose maximum beats the user's running k-th score can contribute (a tie loses:
    the running items have smaller ids), so after the first blocks most of a block is skipped.
    """
    b, w = scores.shape
    thr = run_s.amin(1, keepdim=True)  # (B, 1) running k-th best, -inf while fewer than k
    n_chunks = w // CHUNK
    if n_chunks >= 2:
        body = scores.as_strided((b, n_chunks, CHUNK), (w, CHUNK, 1))  # (B, C, CHUNK) view
        rows, chunks = (body.amax(2) > thr).nonzero(as_tuple=True)  # (H,) each
        if rows.numel() * CHUNK <= b * w // 4:
            cand_s, cand_i = _pack(body, rows, chunks, i0, b)  # (B, P) each
            tail = torch.arange(n_chunks * CHUNK, w, device=scores.device) + i0  # (W - C * CHUNK,)
            cand_s = torch.cat([run_s, cand_s, scores[:, n_chunks * CHUNK :]], 1)  # (B, k + P + tail)
            cand_i = torch.cat([run_i, cand_i, tail.expand(b, -1)], 1)
            return _select(cand_s, cand_i, k)
    ids = torch.arange(i0, i0 + w, device=scores.device).expand(b, -1)  # (B, W)
    top_s, top_i = _select(scores, ids, min(k, w))  # (B, min(k, W)) each
    return _select(torch.cat([run_s, top_s], 1), torch.cat([run_i, top_i], 1), k)  # (B, k) each


def _pack(
    body: torch.Tensor, rows: torch.Tensor, chunks: torch.Tensor, i0: int, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen chunks (rows[h], chunks[h]) of body (B, C, CHUNK) packed left per row: (B, P) scores, ids."""
    counts = torch.bincount(rows, minlength=b)  # (B,)
    width = int(counts.max()) if rows.numel() else 0
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]  # (H,)
    cand_s = torch.full((b, width, CHUNK), NEG_INF, device=body.device)  # (B, P / CHUNK, CHUNK)
    cand_i = torch.full((b, width, CHUNK), -1, dtype=torch.long, device=body.device)
    cand_s[rows, slot] = body[rows, chunks]  # (H, CHUNK)
    cand_i[rows, slot] = chunks.unsqueeze(1) * CHUNK + torch.arange(CHUNK, device=body.device) + i0
    return cand_s.view(b, -1), cand_i.view(b, -1)
