"""Sequence tensors and the Lightning data module."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from features.schema import FEATURE_IDX, ITEM_IDX, SEQUENCE_TYPES, SEQUENCES, check_schema
from features.schema import PAD_IDX as PAD

SHUFFLE_STREAM = 1  # derive_seed stream of the training order (recsys.training uses 0 for each step)


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


@dataclass(frozen=True)
class ItemAttributes:
    """The feature set's item attributes as tensors, for :meth:`recsys.model.SASRec.set_item_features`."""

    ids: torch.Tensor  # (n_items + 1, S) int64: row = item_idx (row 0 padding), the item's value ids, 0 = none
    columns: torch.Tensor  # (n_values + 1,) int64: the attribute column (1, 2, ...) of each value; entry 0 = 0
    trained: torch.Tensor | None = None  # (n_items + 1,) bool: the item has a training event (None: all have)

    @property
    def n_values(self) -> int:
        return self.columns.numel() - 1

    @property
    def slots(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def of(cls, item_features: pl.DataFrame, values: pl.DataFrame, item_map: pl.DataFrame) -> ItemAttributes:
        """From schema.ITEM_FEATURES (rows for item_idx 1..n_items), schema.ITEM_FEATURE_VALUES (feature_idx
        1..n_values) and schema.ITEM_MAP (its ``train_count``: items without one are ``trained`` False).
        Raises ValueError if the tables do not cover those indices once each."""
        n_items = item_map.height
        table = item_features.sort(ITEM_IDX)
        if table[ITEM_IDX].to_list() != list(range(1, n_items + 1)):
            raise ValueError(f"item_features: column '{ITEM_IDX}' must hold 1..{n_items} once each; rebuild the "
                             "features with `recsys features`")
        values = values.sort(FEATURE_IDX)
        if values[FEATURE_IDX].to_list() != list(range(1, values.height + 1)):
            raise ValueError(f"item_feature_values: column '{FEATURE_IDX}' must hold 1..{values.height} once each; "
                             "rebuild the features with `recsys features`")
        number = {name: i + 1 for i, name in enumerate(values["column"].unique(maintain_order=True))}
        columns = torch.tensor([0, *(number[name] for name in values["column"])], dtype=torch.long)
        counts = item_map.sort(ITEM_IDX)["train_count"].to_torch()
        trained = torch.cat([torch.zeros(1, dtype=torch.bool), counts > 0])
        return cls(_padded_rows(table[FEATURE_IDX]), columns, trained)


def _padded_rows(lists: pl.Series) -> torch.Tensor:
    """(len(lists) + 1, S) int64: row 0 zeros, row r + 1 = ``lists[r]`` left-padded with 0 (as :func:`pad_lists`
    lays them out), S = the longest list (at least 1); vectorised (a million items in well under a second)."""
    lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    values = lists.explode().drop_nulls().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # each value's list's first flat position
    cols = width - np.repeat(lengths, lengths) + (np.arange(len(values)) - starts)
    out = np.zeros((len(lengths) + 1, width), dtype=np.int64)
    out[rows, cols] = values
    return torch.from_numpy(out)


class RaggedItems:
    """Variable-length item lists as one flat int32 tensor plus int64 offsets.

    Row r is ``values[offsets[r]:offsets[r + 1]]``.
    """

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor) -> None:
        self.values = values  # (total,)
        self.offsets = offsets  # (R + 1,)
        self.lengths = offsets[1:] - offsets[:-1]  # (R,)

    @classmethod
    def from_series(cls, lists: pl.Series) -> RaggedItems:
        """From a ``List(Int)`` column (null lists count as empty). Raises ``ValueError`` on null items."""
        lengths = torch.as_tensor(lists.list.len().fill_null(0).to_numpy().astype(np.int64))  # (R,)
        values = torch.as_tensor(lists.explode().drop_nulls().to_numpy().astype(np.int32))  # (total,)
        if values.numel() != int(lengths.sum()):
            raise ValueError(f"column '{lists.name}' holds null items; drop them when building sequences")
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, rows: slice) -> RaggedItems:
        """The rows ``rows`` (a contiguous slice) as a RaggedItems of their own, sharing ``values``."""
        start, stop, _ = rows.indices(len(self))
        offsets = self.offsets[start : stop + 1]
        return RaggedItems(self.values[offsets[0] : offsets[-1]], offsets - offsets[0])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """The rows ``rows`` left-padded with 0 to the longest of THEM (at least 1), int64: a batch of users pays
        for its own longest list, not for the longest of the whole table (one heavy user)."""
        return self.rows(rows).pad().long()

    def pad(
        self, rows: torch.Tensor | None = None, width: int | None = None, upto: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Left-padded (R, width) int32 tensor of the LAST ``width`` items of the chosen rows.

        ``rows`` None means all rows; ``width`` None means the longest chosen row (at least 1). ``upto`` (R,)
        cuts each chosen row to its first ``upto`` items before taking the last ``width`` (a window that
        ends earlier in the row); None means whole rows. Values must lie in [0, row length].
        """
        rows = torch.arange(len(self.lengths)) if rows is None else rows
        lengths = self.lengths[rows] if upto is None else upto.long()  # (R,)
        ends = self.offsets[rows] + lengths  # (R,)
        width = max(int(lengths.max()) if len(rows) else 0, 1) if width is None else width
        if self.values.numel() == 0:
            return torch.zeros(len(rows), width, dtype=self.values.dtype)
        col = torch.arange(width)  # (W,)
        real = col >= width - lengths.clamp(max=width).unsqueeze(1)  # (R, W)
        src = (ends.unsqueeze(1) - width + col).clamp(min=0)  # (R, W) flat index of each slot
        return torch.where(real, self.values[src], 0)  # (R, W)


def derive_seed(seed: int, stream: int, *keys: int) -> int:
    """A 32-bit seed that depends only on its arguments; ``stream`` keeps distinct uses apart."""
    return int(np.random.SeedSequence([seed % 2**64, stream, *keys]).generate_state(1)[0])


def mask_items(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_len: int,
    mask_token: int,
    mask_prob: float,
    generator: torch.Generator | None = None,
    types: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A masked-item (cloze, BERT4Rec) batch from a next-item train batch of :class:`SequenceDataModule`.

    inputs, targets: (B, T) as in a train batch (targets = inputs shifted left). The sequence is the inputs
    plus the last target column, i.e. each user's last ``max_len`` train items: (B, W), W = min(T + 1, max_len).
    Each real item is replaced by ``mask_token`` with probability ``mask_prob``; a row left with none masked
    gets one, chosen uniformly among its real items. Random numbers come from ``generator`` (None = torch's
    global generator, which training reseeds every epoch). Returns (inputs, targets), both (B, W): the
    masked sequence, and the hidden item at masked positions with 0 (no target) elsewhere; and with ``types``
    (the batch's ``input_types`` and ``target_types``) the input's event types (B, W), 0 at masked positions
    (the type of a hidden event is not shown, as the [MASK] appended at inference has none), and the hidden
    events' types at masked positions (0 elsewhere), else None and None.
    """
    seq = torch.cat([inputs, targets[:, -1:]], 1)[:, -max_len:]  # (B, W)
    real = seq != PAD  # (B, W)
    device = generator.device if generator is not None else seq.device
    draws = torch.rand((2, *seq.shape), device=device, generator=generator).to(seq.device)  # (2, B, W)
    masked = real & (draws[0] < mask_prob)  # (B, W)
    pick = draws[1].masked_fill(~real, -1.0).argmax(1)  # (B,) a uniform real position
    forced = torch.zeros_like(masked).scatter_(1, pick.unsqueeze(1), True) & real  # (B, W)
    masked |= forced & ~masked.any(1, keepdim=True)
    input_types = target_types = None
    if types is not None:
        seq_types = torch.cat([types[0], types[1][:, -1:]], 1)[:, -max_len:]  # (B, W)
        input_types, target_types = seq_types.masked_fill(masked, PAD), seq_types.masked_fill(~masked, PAD)
    return seq.masked_fill(masked, mask_token), seq.masked_fill(~masked, PAD), input_types, target_types


def drop_items(
    inputs: torch.Tensor, prob: float, types: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item dropout for causal training (``train.item_drop``): each real input item except the last column's is
    replaced by padding with probability ``prob``, so the model reads the history without it while every
    target stays. inputs, types: (B, T), left-padded (the last column is each row's latest item); random
    numbers from ``generator`` (None = torch's global one, reseeded by training). Returns the inputs and the
    types (0 where dropped; None without types)."""
    device = generator.device if generator is not None else inputs.device
    dropped = torch.rand(inputs.shape, device=device, generator=generator).to(inputs.device) < prob  # (B, T)
    dropped[:, -1] = False
    dropped &= inputs != PAD
    return inputs.masked_fill(dropped, PAD), None if types is None else types.masked_fill(dropped, PAD)


class IndexBatchSampler(Sampler[torch.Tensor]):
    """Yields (B,) index tensors: a seeded permutation if ``shuffle``, else in order.

    The permutation is a function of (``seed``, epoch) only, so a run resumed at any epoch replays the same
    order. Lightning calls :meth:`set_epoch` before every epoch; without it each pass uses the next epoch.
    ``group`` G (with ``lengths`` (n,), shuffle only) batches rows of similar length: the permutation is cut
    into runs of G x ``batch_size`` rows, each run is sorted by length (longest first) and cut into batches,
    and the batches are shuffled. Every row still comes once per epoch in ``ceil(n / batch_size)`` batches,
    but a batch holds rows of similar length, so trimming it to its longest row leaves little padding.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        lengths: torch.Tensor | None = None,
        group: int | None = None,
    ) -> None:
        if group is not None and (group < 1 or lengths is None or len(lengths) != n or not shuffle):
            raise ValueError("group needs group >= 1, shuffle and one length per row")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.lengths, self.group = lengths, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle:
            yield from torch.arange(self.n).split(self.batch_size)
            return
        generator = torch.Generator().manual_seed(derive_seed(self.seed, SHUFFLE_STREAM, epoch))
        order = torch.randperm(self.n, generator=generator)  # (n,)
        if self.group is None:
            yield from order.split(self.batch_size)
            return
        batches: list[torch.Tensor] = []
        for run in order.split(self.group * self.batch_size):  # each run but the last: a multiple of B
            by_length = torch.argsort(self.lengths[run], descending=True, stable=True)
            batches.extend(run[by_length].split(self.batch_size))
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class _BatchDataset(Dataset):
    """Map-style dataset indexed by a whole (B,) index tensor; ``make`` slices prebuilt tensors."""

    def __init__(self, n: int, make: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.make(idx)


def _trim_left(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop leading columns where the FIRST tensor (the inputs) is padding in every row.

    Positions are right-aligned, so the model's outputs at real positions do not change.
    """
    real_cols = tensors[0].ne(PAD).any(0)  # (T,)
    start = int(real_cols.int().argmax()) if bool(real_cols.any()) else real_cols.numel() - 1
    return tuple(t[:, start:].contiguous() for t in tensors)


class SequenceDataModule(L.LightningDataModule):
    """Training and validation batches from the SEQUENCES table, built once as tensors.

    Train batch: ``inputs`` (B, T) and ``targets`` (B, T), the inputs shifted left by one (0 = no target),
    from the last ``max_len + 1`` train items of each user with at least 2 of them. With ``window_stride``
    S (1..max_len), a user with more train items also gives the windows of ``max_len + 1`` items that end S,
    2S, ... items earlier, down to the first window that reaches the start of the history, so every train
    item after the first is a target at least once (exactly once when S = max_len); ``train_rows`` holds one
    row per window and an epoch goes through all of them. ``group_by_length`` G batches rows of similar
    length (see :class:`IndexBatchSampler`), so short histories are not padded to the batch's longest.
    Val batch (users with val items, ordered by train length): ``inputs`` (B, T) last ``max_len`` train
    items, ``history`` (B, H) ALL train items (to exclude from the ranking), ``targets`` (B, M) the val items.
    Every tensor is int64, left-padded with 0, and trimmed to the widest row in the batch (train batches
    stay ``max_len`` wide with ``static_shapes``, so that every step has one shape); the tables behind
    them are int32. ``item_counts`` (n_items + 1,) int64: each item's number of train events (all of
    ``train_items``, not only the last ``max_len + 1``); entry 0 is 0.
    With ``n_event_types`` > 0 (the sequences then hold schema.SEQUENCE_TYPES, types 0..n_event_types) a
    train batch also has ``input_types`` and ``target_types`` and a val batch ``input_types``: each item's
    event type, aligned with ``inputs`` / ``targets`` (0 for padding).
    """

    def __init__(
        self,
        sequences: pl.DataFrame,
        n_items: int,
        max_len: int,
        batch_size: int = 128,
        val_batch_size: int = 1024,
        seed: int = 42,
        window_stride: int | None = None,
        group_by_length: int | None = None,
        static_shapes: bool = False,
        n_event_types: int = 0,
    ) -> None:
        super().__init__()
        if window_stride is not None and not 1 <= window_stride <= max_len:
            raise ValueError(f"window_stride must be in [1, max_len = {max_len}], got {window_stride}")
        if group_by_length is not None and group_by_length < 1:
            raise ValueError(f"group_by_length must be at least 1, got {group_by_length}")
        check_schema(sequences, SEQUENCES, "sequences")
        self.n_items, self.max_len = n_items, max_len
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size, seed
        self.group_by_length, self.static_shapes = group_by_length, static_shapes
        self._train = RaggedItems.from_series(sequences["train_items"])
        self._val = RaggedItems.from_series(sequences["val_items"])
        _check_item_range(self._train, "train_items", n_items)
        _check_item_range(self._val, "val_items", n_items)
        self._train_types = _event_types(sequences, self._train, n_event_types) if n_event_types else None
        self.item_counts = torch.bincount(self._train.values.long(), minlength=n_items + 1)  # (n_items + 1,)
        self.train_users = torch.nonzero(self._train.lengths >= 2).squeeze(1)  # (U,) row numbers
        self.train_rows = self._train_windows(self._train, max_len + 1, window_stride)  # (N, max_len + 1), N >= U
        # Users with a validation target and a history, as evaluation.build_eval_set keeps them (a user whose
        # events all fall after the validation cutoff of a time split has nothing to be scored from).
        val_users = torch.nonzero((self._val.lengths >= 1) & (self._train.lengths >= 1)).squeeze(1)  # (V,) rows
        # Ordered by history length, so that val batches are trimmed to little padding.
        self.val_users = val_users[torch.argsort(self._train.lengths[val_users], stable=True)]  # (V,)
        self.val_inputs = self._train.pad(self.val_users, max_len)  # (V, max_len)
        self.train_type_rows = self.val_input_types = None
        if self._train_types is not None:  # the same windows of the type lists
            self.train_type_rows = self._train_windows(self._train_types, max_len + 1, window_stride)
            self.val_input_types = self._train_types.pad(self.val_users, max_len)  # (V, max_len)

    def _train_windows(self, ragged: RaggedItems, width: int, stride: int | None) -> torch.Tensor:
        """One row per training window of ``ragged`` (the train items, or their types): the last ``width``
        values, then (with a stride) earlier windows."""
        if stride is None:
            return ragged.pad(self.train_users, width)
        lengths = self._train.lengths[self.train_users]  # (U,)
        extra = torch.div((lengths - width).clamp(min=0) + stride - 1, stride, rounding_mode="floor")  # (U,)
        counts = extra + 1  # (U,) windows per user
        users = torch.repeat_interleave(self.train_users, counts)  # (N,)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # (N,) index of the user's 1st window
        back = torch.arange(len(users)) - first  # (N,) 0 = the last window, 1 = S items earlier, ...
        upto = torch.repeat_interleave(lengths, counts) - back * stride  # (N,) each window's end in the history
        return ragged.pad(users, width, upto)

    def _train_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self.train_rows[idx].long()  # (B, max_len + 1)
        inputs, targets = rows[:, :-1], rows[:, 1:]  # (B, max_len) each
        # The first item of a short sequence follows padding: nothing to predict it from.
        targets = targets.masked_fill(inputs == PAD, PAD)
        batch = {"inputs": inputs, "targets": targets}
        if self.train_type_rows is not None:
            types = self.train_type_rows[idx].long()  # (B, max_len + 1)
            batch |= {"input_types": types[:, :-1], "target_types": types[:, 1:]}
        if not self.static_shapes:
            batch = dict(zip(batch, _trim_left(*batch.values()), strict=True))  # inputs first
        return batch

    def _val_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        users = self.val_users[idx]  # (B,)
        batch = {"inputs": self.val_inputs[idx].long()}
        if self.val_input_types is not None:
            batch["input_types"] = self.val_input_types[idx].long()
        batch = dict(zip(batch, _trim_left(*batch.values()), strict=True))  # inputs first
        return batch | {"history": self._train.pad(users).long(), "targets": self._val.pad(users).long()}

    def train_dataloader(self) -> DataLoader:
        if len(self.train_users) == 0:
            raise ValueError("sequences: no user has at least 2 train_items; nothing to train on")
        lengths = None if self.group_by_length is None else self.train_rows.ne(PAD).sum(1)  # (N,)
        sampler = IndexBatchSampler(
            len(self.train_rows), self.batch_size, shuffle=True, seed=self.seed, lengths=lengths,
            group=self.group_by_length,
        )
        return self._loader(_BatchDataset(len(self.train_rows), self._train_batch), sampler)

    def val_dataloader(self) -> DataLoader:
        if len(self.val_users) == 0:
            raise ValueError("sequences: no user has val_items; validation needs a val split")
        sampler = IndexBatchSampler(len(self.val_users), self.val_batch_size, shuffle=False)
        return self._loader(_BatchDataset(len(self.val_users), self._val_batch), sampler)

    @staticmethod
    def _loader(dataset: Dataset, sampler: IndexBatchSampler) -> DataLoader:
        # batch_size=None: the sampler yields whole index batches and the dataset slices tensors once per batch.
        return DataLoader(dataset, sampler=sampler, batch_size=None, pin_memory=torch.cuda.is_available())


def _event_types(sequences: pl.DataFrame, train: RaggedItems, n_types: int) -> RaggedItems:
    """The ``train_types`` lists as :class:`RaggedItems`, checked against the sequences' contract, aligned
    with the ``train`` items (one type per item) and in 0..``n_types``; ValueError naming the column otherwise."""
    check_schema(sequences, SEQUENCE_TYPES, "sequences (event types: built from events with data.event_type_col)")
    types = RaggedItems.from_series(sequences["train_types"])
    if not torch.equal(types.offsets, train.offsets):
        raise ValueError("sequences: column 'train_types' does not hold one type per item of 'train_items'")
    if types.values.numel() and (int(types.values.min()) < 0 or int(types.values.max()) > n_types):
        lo, hi = int(types.values.min()), int(types.values.max())
        raise ValueError(f"sequences: column 'train_types' has type indices in [{lo}, {hi}], expected 0..{n_types}")
    return types


def _check_item_range(items: RaggedItems, column: str, n_items: int) -> None:
    if items.values.numel() and (int(items.values.min()) < 1 or int(items.values.max()) > n_items):
        lo, hi = int(items.values.min()), int(items.values.max())
        raise ValueError(f"sequences: column '{column}' has item indices in [{lo}, {hi}], expected 1..{n_items}")
