"""Offline full-catalogue evaluation: every item is ranked, the user's history is excluded, ties are pessimistic.

The same routine scores the model and the baselines (``evaluate.baselines``: popularity, item_knn, ease), so
their numbers are comparable by construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import polars as pl
import torch

from features.schema import EVENT_TYPE, SEQUENCES, TYPE_IDX, USER_IDX, check_schema
from recsys.baselines import ease_scorer, item_knn_scorer, popularity_scorer, popularity_scores, repeat_scorer
from recsys.config import EvaluateConfig
from recsys.data import RaggedItems
from recsys.device import inference
from recsys.metrics import (
    distinct_targets,
    exclusion_mask,
    metrics_from_ranks,
    ranks_among_targets,
    target_ranks,
)
from recsys.topk import count_at_least, count_column, select_top_k, top_k_blocked

logger = logging.getLogger(__name__)

# score_fn(inputs (B, T) long, user_idx (B,) long) -> scores (B, n_items + 1), column 0 = padding.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RankingModel(Protocol):
    """What evaluation needs from a model (an ``nn.Module`` such as ``SASRec``)."""

    training: bool

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...
    def train(self, mode: bool = True) -> Any: ...
    def user_vectors(self, items: torch.Tensor) -> torch.Tensor: ...  # (B, T) -> (B, D); SASRec: types too
    def score(self, hidden: torch.Tensor) -> torch.Tensor: ...  # (..., D) -> (..., n_items + 1)


@runtime_checkable
class BlockRankingModel(RankingModel, Protocol):
    """A model whose scores are ``user_vectors @ item_embeddings().T`` (what blocked evaluation needs)."""

    def item_embeddings(self) -> torch.Tensor: ...  # (n_items + 1, D), row 0 = padding


@dataclass(frozen=True)
class EvalSet:
    """Tensors for one split; all int64, row i is one user, 0 = padding.

    user_idx (U,); inputs (U, max_len) the last ``max_len`` history items, left-padded;
    history (U, H) the full history (excluded from the ranking); targets (U, M) the split's unique items;
    :func:`build_eval_set` stores those two as :class:`RaggedItems`, whose ``[a:b]`` pads only rows a..b-1
    (to their own longest list, int64 as a tensor's would be): one user with 20,000 events or 1,000 targets
    no longer widens every user's row (memory) and every batch's ranking passes (time);
    input_types (U, max_len) the event types of ``inputs`` and target_types (U,) the type of each user's first
    target where the sequences have types, else None.
    """

    user_idx: torch.Tensor
    inputs: torch.Tensor
    history: torch.Tensor | RaggedItems
    targets: torch.Tensor | RaggedItems
    input_types: torch.Tensor | None = None
    target_types: torch.Tensor | None = None  # (U,) the event type of each user's first target, with types

    def __len__(self) -> int:
        return self.user_idx.shape[0]


def _left_pad(frame: pl.DataFrame, column: str, width: int) -> torch.Tensor:
    """(N, width) int64 tensor of the list ``column``, last ``width`` items kept, left-padded with 0. Built from
    one exploded frame, no per-row Python."""
    long = (
        frame.select(pl.int_range(pl.len()).alias("_row"), pl.col(column).list.tail(width))
        .explode(column)
        .drop_nulls(column)
        .with_columns(_col=width - pl.len().over("_row") + pl.int_range(pl.len()).over("_row"))
    )
    out = torch.zeros(frame.height, width, dtype=torch.long)
    out[_to_long(long["_row"]), _to_long(long["_col"])] = _to_long(long[column])
    return out


def _to_long(series: pl.Series) -> torch.Tensor:
    return torch.from_numpy(series.to_numpy().astype(np.int64))  # a writable copy


def split_histories(sequences: pl.DataFrame, split: Literal["val", "test"]) -> pl.DataFrame:
    """(``user_idx``, ``history``) for every user: what is known when ``split`` is predicted, and
    ``history_types``, its events' types, where the sequences have them (schema.SEQUENCE_TYPES).

    val: train_items; test: train_items + val_items. Raises ``ValueError`` on an unknown split.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    history = pl.col("train_items") if split == "val" else pl.concat_list("train_items", "val_items")
    columns = [pl.col(USER_IDX), history.alias("history")]
    if "train_types" in sequences.columns:
        types = pl.col("train_types") if split == "val" else pl.concat_list("train_types", "val_types")
        columns.append(types.alias("history_types"))
    return sequences.select(columns)


def build_eval_set(sequences: pl.DataFrame, split: Literal["val", "test"], max_len: int) -> EvalSet:
    """Eval tensors for ``split`` from a SEQUENCES table.

    val: history = train_items, targets = val_items; test: history = train_items + val_items,
    targets = test_items. Users with no target or an empty history are dropped.
    Raises ``ValueError`` on a schema mismatch, an unknown split or ``max_len`` < 1.
    """
    check_schema(sequences, SEQUENCES, "sequences")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    frame = split_histories(sequences, split).with_columns(
        sequences[f"{split}_items"].list.unique(maintain_order=True).alias("targets"),
    )
    if "history_types" in frame.columns:
        frame = frame.with_columns(sequences[f"{split}_types"].list.first().fill_null(0).alias("target_type"))
    frame = frame.filter((pl.col("history").list.len() > 0) & (pl.col("targets").list.len() > 0))
    return EvalSet(
        user_idx=_to_long(frame[USER_IDX]),
        inputs=_left_pad(frame, "history", max_len),
        history=RaggedItems.from_series(frame["history"]),
        targets=RaggedItems.from_series(frame["targets"]),
        input_types=_left_pad(frame, "history_types", max_len) if "history_types" in frame.columns else None,
        target_types=_to_long(frame["target_type"]) if "target_type" in frame.columns else None,
    )


def users_without_history(sequences: pl.DataFrame, split: Literal["val", "test"]) -> int:
    """Users with a ``split`` target but no event before it (:func:`build_eval_set` leaves them out: no scorer
    ranks them), e.g. under ``features.split: time`` users whose events all fall after the cutoff."""
    history = split_histories(sequences, split)["history"].list.len()
    return int(((history == 0) & (sequences[f"{split}_items"].list.len() > 0)).sum())


# evaluate.exclude_seen=true ranks a re-consumed target while dropping the rest of the user's history: above this
# share of such targets the report warns (a scorer that favours the user's own items is rewarded on them).
SEEN_TARGET_WARN = 0.01


def seen_targets(sequences: pl.DataFrame, split: Literal["val", "test"]) -> tuple[int, int]:
    """``(seen, total)`` over the users :func:`build_eval_set` keeps: ``total`` their distinct ``split`` targets,
    ``seen`` those already in the user's history before the split (a re-consumption). With seen items excluded
    (evaluate.exclude_seen) these targets are still ranked while every other history item is not."""
    frame = split_histories(sequences, split).with_columns(
        sequences[f"{split}_items"].list.unique().alias("targets"),
    ).filter(pl.col("history").list.len() > 0)
    counts = frame.select(
        seen=pl.col("targets").list.set_intersection(pl.col("history")).list.len().sum(),
        total=pl.col("targets").list.len().sum(),
    )
    return int(counts["seen"][0] or 0), int(counts["total"][0] or 0)


def _check_items(eval_set: EvalSet, n_items: int) -> None:
    for name in ("history", "targets"):
        rows: torch.Tensor | RaggedItems = getattr(eval_set, name)
        values = rows.values if isinstance(rows, RaggedItems) else rows
        if values.numel() and (int(values.min()) < 0 or int(values.max()) > n_items):
            raise ValueError(
                f"eval set: '{name}' holds item indices up to {int(values.max())}, expected 0..{n_items}; "
                "is n_items the size of the item map?"
            )


class MetricAccumulator:
    """Per-user metrics and catalogue coverage gathered batch by batch; the result does not depend on batching."""

    def __init__(self, n_items: int, ks: tuple[int, ...]) -> None:
        self.ks = ks
        self.per_user: dict[str, list[torch.Tensor]] = {}
        self.covered = {k: torch.zeros(n_items + 1, dtype=torch.bool) for k in ks}
        self.n_users = 0

    def add(self, ranks: torch.Tensor, top: torch.Tensor) -> None:
        """ranks (B, M) pessimistic 0-based target ranks, -1 = no target; top (B, K) each user's best item
        indices, best first, 0 = none (K >= max(ks) unless the catalogue is smaller)."""
        # Ranks are exact integers on any device; the metric arithmetic runs on the CPU so that the values do
        # not depend on the device's float32 log2 (CUDA and CPU differ in the last bit).
        for key, values in metrics_from_ranks(ranks.cpu(), self.ks).items():
            self.per_user.setdefault(key, []).append(values)
        for k in self.ks:
            self.covered[k][top[:, :k].cpu()] = True
        self.n_users += ranks.shape[0]

    def values(self) -> dict[str, torch.Tensor]:
        """Per-user ``ndcg/hr/recall/mrr_at_K`` (float64, users in the order they were added)."""
        return {key: torch.cat(parts).double() for key, parts in self.per_user.items()}

    def result(self) -> dict[str, float]:
        """Mean ``ndcg/hr/recall/mrr_at_K`` over users, their standard errors ``…_se`` (sample standard
        deviation over users / sqrt(users); with 2 users or more), ``coverage_at_K`` (share of the catalogue in
        at least one user's top K) and ``n_users``."""
        out = means(self.values())
        out.update({f"coverage_at_{k}": self.covered[k][1:].double().mean().item() for k in self.ks})
        out["n_users"] = float(self.n_users)
        return out


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of ``values`` (1-D float64, at least 2): sample std (n - 1) / sqrt(n)."""
    return (values.std(correction=1) / math.sqrt(len(values))).item()


def paired_deltas(model: MetricAccumulator, other: MetricAccumulator) -> dict[str, float]:
    """``delta_<metric>`` = mean over users of (model - other) on the same users, and ``delta_<metric>_se``
    its standard error (paired: user-to-user variation shared by both cancels). Raises ValueError if the two
    were not gathered on the same number of users."""
    a, b = model.values(), other.values()
    if model.n_users != other.n_users:
        raise ValueError(f"paired deltas need the same users: {model.n_users} vs {other.n_users}")
    return means({key: a[key] - b[key] for key in a}, "delta_")


def means(values: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """``<prefix><metric>``: the mean of each per-user tensor of ``values`` (when not empty), and
    ``<prefix><metric>_se`` its standard error (2 users or more)."""
    out = {}
    for key, per_user in values.items():
        if len(per_user):
            out[f"{prefix}{key}"] = per_user.mean().item()
        if len(per_user) > 1:
            out[f"{prefix}{key}_se"] = standard_error(per_user)
    return out


def _check_eval_args(eval_set: EvalSet, n_items: int, ks: tuple[int, ...], batch_size: int) -> None:
    if len(eval_set) == 0:
        raise ValueError("eval set has no users with both a history and a target; check the split")
    if not ks or min(ks) < 1 or batch_size < 1:
        raise ValueError(f"ks must be positive and batch_size >= 1, got ks={ks}, batch_size={batch_size}")
    _check_items(eval_set, n_items)


def evaluate_scorer(
    score_fn: ScoreFn,
    eval_set: EvalSet,
    n_items: int,
    ks: tuple[int, ...] = (10, 20, 50),
    batch_size: int = 1024,
) -> dict[str, float]:
    """Mean ``ndcg/hr/recall/mrr_at_K`` over users, ``coverage_at_K`` and ``n_users``.

    Full catalogue, history excluded (targets never), pessimistic ties. ``coverage_at_K`` is the share of
    the catalogue in at least one user's top K. The result does not depend on ``batch_size``.
    Raises ``ValueError`` on an empty eval set, out-of-range items or a wrong score shape.
    """
    return accumulate_scorer(score_fn, eval_set, n_items, ks, batch_size).result()


def accumulate_scorer(
    score_fn: ScoreFn, eval_set: EvalSet, n_items: int, ks: tuple[int, ...], batch_size: int
) -> MetricAccumulator:
    """:func:`evaluate_scorer`'s per-user metrics, before they are averaged."""
    _check_eval_args(eval_set, n_items, ks, batch_size)
    totals = MetricAccumulator(n_items, ks)
    for start in range(0, len(eval_set), batch_size):
        rows = slice(start, start + batch_size)
        scores = score_fn(eval_set.inputs[rows], eval_set.user_idx[rows])  # (B, n_items + 1)
        if scores.shape != (eval_set.inputs[rows].shape[0], n_items + 1):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected (B, {n_items + 1})")
        targets = eval_set.targets[rows].to(scores.device)  # (B, M)
        exclude = exclusion_mask(eval_set.history[rows].to(scores.device), n_items, keep=targets)
        totals.add(*ranks_and_top(scores, targets, exclude, max(ks)))
    return totals


def ranks_and_top(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_ranks(scores, targets, exclude)`` and ``_top_items(scores, exclude, k)``, the targets never
    excluded (``exclusion_mask(..., keep=targets)``).

    Without NaN scores or -inf target scores (the usual case) both come from one copy of the scores with the
    excluded items at -inf: a target's rank is the number of entries of that copy at or above its score,
    less the distinct targets there, plus the other targets ranked above it; the (B, I) passes are one copy,
    one word-packed count per target column and one top-k, instead of about ten. Otherwise the reference path.
    """
    scores = scores.float()
    targets = targets.long()
    t_scores = scores.gather(1, targets)  # (B, M)
    distinct = distinct_targets(targets)  # (B, M)
    if bool(scores.isnan().any()) or bool((t_scores.isneginf() & distinct).any()):
        return target_ranks(scores, targets, exclude), _top_items(scores, exclude, k)
    masked = scores.masked_fill(exclude, float("-inf"))  # (B, I) the candidates; padding column 0 is excluded
    ahead = torch.empty_like(targets)  # (B, M) non-excluded, non-target items scoring >= each target
    m = targets.shape[1]
    targets_there = _targets_at_least(t_scores, distinct)  # (B, M) distinct targets scoring >= each (itself too)
    for j in range(m):
        column = t_scores[:, j : j + 1]
        count = count_at_least(masked, column) if m == 1 else count_column(masked, column, distinct[:, j])
        ahead[:, j] = count - targets_there[:, j]
    return ranks_among_targets(ahead, t_scores, targets), _top_of_candidates(masked, k)


def _targets_at_least(t_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, M) for each valid target the number of the row's valid targets scoring >= it, itself included (any
    value where not valid); valid scores are finite or +inf. One sort and one search per row: O(B·M log M),
    not a (B, M) comparison per target (a user with 1,000 targets under a time split)."""
    m = t_scores.shape[1]
    if m == 1:
        return valid.long()
    ascending = torch.where(valid, t_scores, float("-inf")).sort(dim=1)[0]  # the invalid ones first, at -inf
    return m - torch.searchsorted(ascending, t_scores.contiguous(), side="left")


def _top_items(scores: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) each row's best item indices after exclusion by (score desc, index asc), 0 = none.

    Excluded items and NaN or -inf scores are no candidates (as in :func:`evaluate_model_blocked`).
    """
    return _top_of_candidates(scores.float().masked_fill(exclude | scores.isnan(), float("-inf")), k)


def _top_of_candidates(masked: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) best item indices of float32 scores (B, I) whose non-candidates are -inf, 0 = none."""
    index = torch.arange(masked.shape[1], device=masked.device)  # (I,)
    return select_top_k(masked, index, min(k, masked.shape[1]))[1].clamp(min=0)  # (B, k)


def evaluate_model_blocked(
    model: BlockRankingModel,
    eval_set: EvalSet,
    n_items: int,
    ks: tuple[int, ...] = (10, 20, 50),
    batch_size: int = 1024,
    item_block_size: int = 16384,
) -> dict[str, float]:
    """:func:`evaluate_scorer` of :func:`model_scorer`, without a (B, n_items + 1) score matrix.

    Each batch of user vectors is ranked against ``model.item_embeddings()`` in blocks of
    ``item_block_size`` items with a running top-K merge (:func:`recsys.topk.top_k_blocked`), so memory is
    O(batch_size * item_block_size). Same metrics as the dense path; raises as :func:`evaluate_scorer`, and
    ``ValueError`` if the model's user or item vectors hold NaN or inf (the dense path would rank NaN last).
    """
    return accumulate_model_blocked(model, eval_set, n_items, ks, batch_size, item_block_size).result()


def accumulate_model_blocked(
    model: BlockRankingModel, eval_set: EvalSet, n_items: int, ks: tuple[int, ...], batch_size: int,
    item_block_size: int,
) -> MetricAccumulator:
    """:func:`evaluate_model_blocked`'s per-user metrics, before they are averaged."""
    _check_eval_args(eval_set, n_items, ks, batch_size)
    totals = MetricAccumulator(n_items, ks)
    with inference(model) as device:
        items = model.item_embeddings()[1:]  # (n_items, D), row r = item index r + 1
        for start in range(0, len(eval_set), batch_size):
            rows = slice(start, start + batch_size)
            types = None
            if getattr(model, "n_event_types", 0) and eval_set.input_types is not None:
                types = eval_set.input_types[rows].to(device)
            inputs = eval_set.inputs[rows].to(device)
            users = model.user_vectors(inputs) if types is None else model.user_vectors(inputs, types)  # (B, D)
            found = top_k_blocked(
                users, items, min(max(ks), n_items), _positions(eval_set.history, rows),
                eval_set.targets[rows] - 1, batch_size, item_block_size, device,
            )
            assert found.ranks is not None
            totals.add(found.ranks, found.ids + 1)  # ids -1 (none) -> 0
    return totals


def _positions(history: torch.Tensor | RaggedItems, rows: slice) -> RaggedItems:
    """The ``rows`` of ``history`` (item indices; as a padded (U, H) tensor, 0 = padding) as ragged 0-based row
    positions (item index - 1) of the item table; a :class:`RaggedItems` history is sliced, not padded first."""
    if isinstance(history, RaggedItems):
        part = history.rows(rows)
        return RaggedItems(part.values - 1, part.offsets)
    padded = history[rows]
    real = padded > 0  # (B, H)
    offsets = torch.zeros(padded.shape[0] + 1, dtype=torch.long)
    offsets[1:] = real.sum(1).cumsum(0)
    return RaggedItems((padded[real] - 1).int(), offsets)


def model_scorer(model: RankingModel, eval_set: EvalSet | None = None, history_bias: bool = True) -> ScoreFn:
    """``model.score(model.user_vectors(inputs))`` under ``no_grad`` in eval mode (the mode is restored), in
    exact float32 on the model's device: the scores stay there (the metrics move them back to the CPU).
    A model with event types (SASRec, ``n_event_types`` > 0) gets each user's ``input_types`` from the
    ``eval_set`` the scorer will be run on (looked up by ``user_idx``). A model with a repeat bias
    (``model.repeat_bias``) adds it only with ``history_bias``: pass ``not exclude_seen``. With seen items
    excluded the ranking keeps just a target that is itself a repeat, so the bonus could land on nothing but
    the target (a leak); serving with seen items excluded ignores it too."""
    types, row_of = None, None
    if getattr(model, "n_event_types", 0):
        if eval_set is None or eval_set.input_types is None:
            raise ValueError("the model embeds event types: score it on an eval set built from sequences with "
                             "event types (data.event_type_col)")
        types = eval_set.input_types
        row_of = torch.full((int(eval_set.user_idx.max()) + 1 if len(eval_set) else 1,), -1, dtype=torch.long)
        row_of[eval_set.user_idx] = torch.arange(len(eval_set))

    def score(inputs: torch.Tensor, user_idx: torch.Tensor) -> torch.Tensor:
        with inference(model) as device:
            inputs = inputs.to(device)
            if hasattr(model, "scores"):  # SASRec: with its repeat bias and event types, if any
                batch_types = None if row_of is None else types[row_of[user_idx]].to(device)  # (B, max_len)
                if history_bias:
                    return model.scores(inputs, batch_types)  # (B, n_items + 1)
                return model.score(model.user_vectors(inputs, batch_types))
            return model.score(model.user_vectors(inputs))  # (B, n_items + 1)

    return score


def baseline_scorers(
    sequences: pl.DataFrame, n_items: int, cfg: EvaluateConfig, item_popularity: torch.Tensor | None = None
) -> dict[str, ScoreFn]:
    """The scorers of ``cfg.baselines``, item_knn, ease and repeat fitted on the histories of ``cfg.split``.

    ``item_popularity`` (n_items + 1,) defaults to :func:`popularity_scores` of ``sequences`` for ``cfg.split``. ease is
    skipped, with a logged warning, when ``n_items`` > ``cfg.ease_max_items`` (its dense n_items x n_items
    inverse).
    """
    histories = split_histories(sequences, cfg.split)
    scorers: dict[str, ScoreFn] = {}
    pop = item_popularity if item_popularity is not None else popularity_scores(sequences, n_items, cfg.split)
    for name in dict.fromkeys(cfg.baselines):  # in order, once each
        if name == "popularity":
            scorers[name] = popularity_scorer(pop)
        elif name == "repeat":
            scorers[name] = repeat_scorer(histories, n_items, pop)
        elif name == "item_knn":
            scorers[name] = item_knn_scorer(histories, n_items, cfg.knn_neighbors, cfg.knn_history)
        elif n_items > cfg.ease_max_items:
            logger.warning("baseline ease skipped: %d items > evaluate.ease_max_items (%d); its dense "
                           "%d x %d inverse would be too large", n_items, cfg.ease_max_items, n_items, n_items)
        else:
            scorers[name] = ease_scorer(histories, n_items, cfg.ease_lambda)
    return scorers


def evaluate_all(
    model: RankingModel,
    sequences: pl.DataFrame,
    n_items: int,
    item_popularity: torch.Tensor | None,
    cfg: EvaluateConfig,
    max_len: int,
    event_types: pl.DataFrame | None = None,
) -> dict[str, dict[str, float]]:
    """``{"model": metrics, <baseline>: metrics, ...}`` on ``cfg.split``, baselines as in ``cfg.baselines``
    (:func:`baseline_scorers`; a skipped one has no key). With ``cfg.item_block_size`` set, the model is
    scored in item blocks (:func:`evaluate_model_blocked`, same metrics); the baselines keep the dense path.
    Every scorer's metrics hold their standard errors (``…_se``); a baseline's also hold the model's paired
    difference from it (:func:`paired_deltas`: ``delta_<metric>`` = model - baseline, ``delta_<metric>_se``).

    ``item_popularity`` (n_items + 1,) defaults to :func:`popularity_scores` of ``sequences`` for ``cfg.split``. With
    ``cfg.type_segments`` every scorer also gets ``type_segments`` (:func:`type_segments` over ``event_types``,
    the features' schema.EVENT_TYPE_MAP).
    """
    eval_set = build_eval_set(sequences, cfg.split, max_len)
    ranked = ranking_set(eval_set, cfg.exclude_seen)
    baselines = baseline_scorers(sequences, n_items, cfg, item_popularity)
    if cfg.item_block_size is None:
        scorer = model_scorer(model, eval_set, history_bias=not cfg.exclude_seen)
        model_totals = accumulate_scorer(scorer, ranked, n_items, cfg.ks, cfg.batch_size)
        how = "dense"
    elif getattr(model, "repeat_bias", False) and not cfg.exclude_seen:
        raise ValueError("a model with a repeat bias ranking seen items (evaluate.exclude_seen=false) is scored "
                         "densely: set evaluate.item_block_size to null")
    elif isinstance(model, BlockRankingModel):
        model_totals = accumulate_model_blocked(model, ranked, n_items, cfg.ks, cfg.batch_size,
                                                cfg.item_block_size)
        how = f"item blocks of {cfg.item_block_size}"
    else:
        raise ValueError("evaluate.item_block_size needs a model with item_embeddings() (such as SASRec); "
                         "set it to null for this model")
    results: dict[str, dict[str, Any]] = {"model": model_totals.result()}
    results["model"]["users_without_history"] = float(cold := users_without_history(sequences, cfg.split))
    if cold:
        logger.warning("%d users with a %s target have no history before it (cold start): no scorer ranks them, "
                       "so the metrics are over the other %d users (users_without_history in the report)", cold,
                       cfg.split, len(eval_set))
    seen, total = seen_targets(sequences, cfg.split)
    results["model"]["seen_targets"] = float(seen)
    if cfg.exclude_seen and total and seen / total >= SEEN_TARGET_WARN:
        logger.warning("%d of the %d %s targets (%.1f %%) are items the user already had: evaluate.exclude_seen=true "
                       "drops the rest of each history from the ranking but keeps these targets, so a scorer that "
                       "favours the user's own items gets them for free; for a domain where users re-consume, "
                       "evaluate with evaluate.exclude_seen=false (seen_targets in the report)", seen, total,
                       cfg.split, 100 * seen / total)
    logger.info("model on %d users (%s): %s", len(eval_set), how, _summary(results["model"], cfg.ks))
    split_by = {"segments": history_segments(eval_set, cfg.history_segments),
                "type_segments": type_segments(eval_set, event_types) if cfg.type_segments else {}}
    for key, segments in split_by.items():
        if segments:
            results["model"][key] = segment_results(model_totals, None, segments)
    for name, score_fn in baselines.items():
        totals = accumulate_scorer(score_fn, ranked, n_items, cfg.ks, cfg.batch_size)
        results[name] = {**totals.result(), **paired_deltas(model_totals, totals)}
        for key, segments in split_by.items():
            if segments:
                results[name][key] = segment_results(totals, model_totals, segments)
        logger.info("%s on %d users: %s", name, len(eval_set), _summary(results[name], cfg.ks))
    return results


def ranking_set(eval_set: EvalSet, exclude_seen: bool) -> EvalSet:
    """``eval_set`` as the ranking sees it: with ``exclude_seen`` False (evaluate.exclude_seen) its history
    excludes nothing (an empty one), so the items a user has seen compete like any other; inputs unchanged."""
    if exclude_seen:
        return eval_set
    return replace(eval_set, history=torch.zeros(len(eval_set), 1, dtype=torch.long))


def history_segments(eval_set: EvalSet, bounds: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Users by history length (events before the target, the whole history): for bounds (5, 20) the masks
    of "1-4", "5-19" and "20+" over the eval set's users ("1" for a segment of one length); {} without
    bounds."""
    if not bounds:
        return {}
    history = eval_set.history
    lengths = history.lengths if isinstance(history, RaggedItems) else (history > 0).sum(dim=1)
    edges = [1, *bounds]
    out = {(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"): (lengths >= lo) & (lengths < hi)
           for lo, hi in zip(edges, edges[1:], strict=False)}
    out[f"{edges[-1]}+"] = lengths >= edges[-1]
    return out


def type_segments(eval_set: EvalSet, event_types: pl.DataFrame | None) -> dict[str, torch.Tensor]:
    """Users by the event type of their (first) target: one mask per type of ``event_types`` (schema.EVENT_TYPE_MAP)
    that some target has, in ``type_idx`` order, plus "(none)" for targets without a type. Raises ValueError
    if the eval set or ``event_types`` has no types."""
    if eval_set.target_types is None or event_types is None:
        raise ValueError("evaluate.type_segments needs features with event types: set data.event_type_col")
    out = {}
    for name, idx in event_types.sort(TYPE_IDX).select(EVENT_TYPE, TYPE_IDX).iter_rows():
        out[name] = eval_set.target_types == idx
    out["(none)"] = eval_set.target_types == 0
    return {name: mask for name, mask in out.items() if bool(mask.any())}


def segment_results(
    totals: MetricAccumulator, model: MetricAccumulator | None, segments: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per segment (masks over the users in the order they were added): ``n_users``, the mean of every
    per-user metric with its standard error (``…_se``, 2 users or more), and, against ``model`` (a baseline's
    segments), the paired ``delta_<metric>`` / ``delta_<metric>_se``. Coverage is not split by segment."""
    values = totals.values()
    theirs = None if model is None else model.values()
    out = {}
    for label, mask in segments.items():
        out[label] = {"n_users": float(mask.sum()), **means({k: v[mask] for k, v in values.items()})}
        if theirs is not None:
            out[label] |= means({k: theirs[k][mask] - v[mask] for k, v in values.items()}, "delta_")
    return out


def _summary(metrics: dict[str, float], ks: tuple[int, ...]) -> str:
    k = min(ks)
    return ", ".join(f"{m}_at_{k}={metrics[f'{m}_at_{k}']:.4f}" for m in ("ndcg", "hr", "recall", "mrr"))
