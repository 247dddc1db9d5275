"""SASRec: a pre-LayerNorm Transformer over left-padded item sequences (Kang & McAuley, 2018).

The model is plain PyTorch: ``forward`` maps item indices to hidden states and ``score`` ranks the whole
catalogue by a dot product with the (shared) item embedding table. Loss, optimiser and logging live in
:mod:`recsys.system`.

``attention="causal"`` is SASRec (each position sees itself and the past; trained on the next item).
``attention="bidirectional"`` is the BERT4Rec recipe (Sun et al., 2019) in the same code: every real position
sees every other, the table has an extra [MASK] row (index ``n_items + 1``, never a candidate), training
predicts masked items (:func:`recsys.data.mask_items`), and :meth:`SASRec.user_vectors` appends a [MASK]
after the history and reads the hidden state there.

Item attributes (``n_feature_values`` > 0, ``model.item_features``): each item's vector, in the input and in the
output table alike, is its id embedding plus, for every attribute column, the mean of the embeddings of the
item's values in that column (category, brand, genres); an item with no value keeps its id embedding alone,
and an item with no training event (a new arrival, ``data.item_features.cold_items``) has its attributes alone:
its id row would only ever be pushed down as a negative. The item -> values table is a buffer set by
:meth:`SASRec.set_item_features`, saved with the weights, so a saved model scores without the feature files.

Event types (``n_event_types`` > 0, ``model.event_types``): each input position also adds the embedding of its
event's type (view, cart, purchase: ``type_idx`` 1..n_event_types of the feature set's EVENT_TYPE_MAP), as it
adds its position's; type 0 (padding, a null type, the [MASK] position, a type the model never saw) adds
nothing. Types are input context only: the output table (what is ranked) is the items' alone.

Ensemble (``model.ensemble`` K > 1): :class:`SASRecEnsemble` holds K independently initialised SASRec networks
and scores an item by the mean of their scores (one dot product K*D wide); each member trains on its own loss.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys.storage import damaged, not_damage, read_json, write_json

PAD = 0
ATTENTION = ("causal", "bidirectional")
BLOCKS = ("sasrec", "ligr")
WEIGHTS_FILE = "model.pt"
KWARGS_FILE = "model.json"


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is drawn as ``rand >= p``: the same distribution as ``F.dropout`` (keep with
    probability 1 - p, kept values scaled by 1 / (1 - p)), 2.5x faster on the CPU, where ``F.dropout``'s
    ``bernoulli_`` took 16 % of a Beauty training step (BENCHMARKS.md "CPU step"). GPU and eval: ``F.dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0 or self.inplace:
            return super().forward(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # same shape as x
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class _SwiGLU(nn.Module):
    """Gated feed-forward layer (Shazeer, 2020): W_out(silu(W_a h) * W_b h), no biases, width ``width``."""

    def __init__(self, hidden: int, width: int, dropout: float) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden, 2 * width, bias=False)  # W_a and W_b in one GEMM
        self.drop = Dropout(dropout)
        self.out = nn.Linear(width, hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.inner(h).chunk(2, dim=-1)  # 2 x (..., width)
        return self.out(self.drop(F.silu(a) * b))  # (..., hidden)


class _Block(nn.Module):
    """Pre-LN block. ``sasrec``: x + Attn(LN(x)), then x + FFN(LN(x)) with a GELU FFN. ``ligr``: the LiGR layer
    ("From Features to Transformers", 2025, as eSASRec uses it): each residual branch is scaled by a gate
    sigmoid(W x + b) computed from the block's input, and the FFN is a SwiGLU."""

    def __init__(
        self, hidden: int, n_heads: int, dropout: float, ffn_mult: int = 1, block: str = "sasrec"
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        # Position-wise FFN of width ffn_mult x hidden: 1 as in the SASRec paper, 4 as in language models.
        width = ffn_mult * hidden
        self.gates: nn.ModuleList | None = None
        if block == "ligr":
            self.ffn: nn.Module = _SwiGLU(hidden, width, dropout)
            self.gates = nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)])  # attention, FFN
        else:
            self.ffn = nn.Sequential(
                nn.Linear(hidden, width), nn.GELU(), Dropout(dropout), nn.Linear(width, hidden)
            )
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x: (B, T, D); mask: (B, 1, T, T) bool, True where a query may attend to a key.

        Returns (B, T, D), or (B, 1, D) for the last position only if ``last_only`` (keys still span all T).
        """
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)  # 3 x (B, T, D)
        if last_only:
            x, q, mask = x[:, -1:], q[:, -1:], mask[:, :, -1:]  # (B, 1, D), (B, 1, D), (B, 1, 1, T)
        tq = q.shape[1]
        q = q.reshape(b, tq, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, Tq, Dh)
        k, v = (z.reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (k, v))  # (B, H, T, Dh)
        # No dropout on the attention probabilities: on CPU it doubles the attention cost (the fused
        # kernels do not support it); the residual, FFN and embedding dropout regularise instead.
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tq, Dh)
        x = self._residual(0, x, self.drop(self.proj(att.transpose(1, 2).reshape(b, tq, d))))  # (B, Tq, D)
        return self._residual(1, x, self.drop(self.ffn(self.ffn_norm(x))))  # (B, Tq, D)

    def _residual(self, i: int, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + branch; for ligr x + sigmoid(gate_i(x)) * branch (i: 0 attention, 1 FFN)."""
        return x + branch if self.gates is None else x + torch.sigmoid(self.gates[i](x)) * branch


class SASRec(nn.Module):
    """Self-attentive sequential recommender.

    Inputs are LEFT-padded with 0 and positions are right-aligned (the last column always has position
    ``max_len - 1``), so extra left padding does not change the outputs at real positions.
    ``mask_token`` is ``n_items + 1`` for bidirectional attention, None for causal.
    """

    def __init__(
        self,
        n_items: int,
        max_len: int,
        hidden: int,
        n_blocks: int,
        n_heads: int,
        dropout: float,
        attention: Literal["causal", "bidirectional"] = "causal",
        ffn_mult: int = 1,
        block: Literal["sasrec", "ligr"] = "sasrec",
        repeat_bias: bool = False,
        n_feature_values: int = 0,
        feature_slots: int = 0,
        n_event_types: int = 0,
    ) -> None:
        super().__init__()
        if n_event_types < 0:
            raise ValueError(f"n_event_types must be >= 0, got {n_event_types}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if ffn_mult < 1:
            raise ValueError(f"ffn_mult must be >= 1, got {ffn_mult}")
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by n_heads ({n_heads})")
        if n_items < 1 or max_len < 1:
            raise ValueError(f"n_items ({n_items}) and max_len ({max_len}) must be positive")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if repeat_bias and attention != "causal":
            raise ValueError("repeat_bias needs causal attention")
        if n_feature_values < 0 or feature_slots < 0 or (n_feature_values > 0) != (feature_slots > 0):
            raise ValueError(f"n_feature_values ({n_feature_values}) and feature_slots ({feature_slots}) must "
                             "both be positive (item attributes) or both 0 (ids only)")
        self.kwargs: dict[str, Any] = dict(
            n_items=n_items, max_len=max_len, hidden=hidden, n_blocks=n_blocks,
            n_heads=n_heads, dropout=dropout, attention=attention, ffn_mult=ffn_mult, block=block,
        )
        if repeat_bias:  # only then in model.json, so models without it stay loadable by older code
            self.kwargs["repeat_bias"] = True
        if n_feature_values:  # likewise
            self.kwargs |= {"n_feature_values": n_feature_values, "feature_slots": feature_slots}
        if n_event_types:  # likewise
            self.kwargs["n_event_types"] = n_event_types
        self.n_items, self.max_len, self.attention = n_items, max_len, attention
        self.causal = attention == "causal"
        self.mask_token: int | None = None if self.causal else n_items + 1
        self.item_emb = nn.Embedding(n_items + (1 if self.causal else 2), hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, hidden)
        # Event types: row 0 (no type) is zero and stays zero (padding_idx: no gradient)
        self.type_emb = nn.Embedding(n_event_types + 1, hidden, padding_idx=PAD) if n_event_types else None
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, n_heads, dropout, ffn_mult, block) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(hidden)
        # Repeat bias: a learned score bonus w[d] for an item the user consumed d steps before the scored
        # position (d = 0: the item at that position), summed over its occurrences in the window. Zero at
        # the start, so training starts as plain SASRec; see history_bias.
        self.repeat_weight = nn.Parameter(torch.zeros(max_len)) if repeat_bias else None
        # With event types as well: a learned bonus per type of the window event (a carted item is more likely
        # bought than a viewed one), added to its recency bonus; type 0 (none) has none. Zero at the start.
        self.repeat_type_weight = (nn.Parameter(torch.zeros(n_event_types))
                                   if repeat_bias and n_event_types else None)
        # Item attributes: value embeddings (row 0 = no value) and, per item row, its values (feature_slots
        # columns, 0-padded) with weights 1 / (the item's number of values in that value's column), so that
        # a weighted sum is the sum over columns of each column's mean.
        self.feature_emb = (nn.Embedding(n_feature_values + 1, hidden, padding_idx=PAD)
                            if n_feature_values else None)
        # None buffers (no attributes) stay out of the state dict, so models without attributes load as before
        rows = self.item_emb.num_embeddings
        self.item_feature_ids: torch.Tensor | None
        self.item_feature_weights: torch.Tensor | None
        self.register_buffer("item_feature_ids", torch.zeros(rows, feature_slots, dtype=torch.long)
                             if n_feature_values else None)
        self.register_buffer("item_feature_weights", torch.zeros(rows, feature_slots) if n_feature_values else None)
        # 1 for an item whose id embedding is used, 0 for one scored by its attributes alone (no training event)
        self.item_id_weights: torch.Tensor | None
        self.register_buffer("item_id_weights", torch.ones(rows) if n_feature_values else None)
        self.apply(_init_weights)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
            for table in (self.feature_emb, self.type_emb):
                if table is not None:
                    table.weight[PAD].zero_()

    def forward(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """items: (B, T) int, T <= max_len, 0 = padding; types: (B, T) each event's type (0 = none), needed
        by a model with event types and ignored by one without. Returns hidden states (B, T, D)."""
        return self._encode(items, last_only=False, types=types)

    @property
    def n_event_types(self) -> int:
        return 0 if self.type_emb is None else self.type_emb.num_embeddings - 1

    def _encode(self, items: torch.Tensor, last_only: bool, types: torch.Tensor | None = None) -> torch.Tensor:
        t = items.shape[1]
        if t > self.max_len:
            raise ValueError(f"input width {t} exceeds max_len {self.max_len}; keep the last max_len items")
        keep = items != PAD  # (B, T)
        pos = torch.arange(self.max_len - t, self.max_len, device=items.device)  # (T,) right-aligned
        x = self.item_vectors(items) + self.pos_emb(pos)  # (B, T, D)
        if self.type_emb is not None:
            if types is None or types.shape != items.shape:
                got = None if types is None else tuple(types.shape)
                raise ValueError(f"this model embeds event types (n_event_types = {self.n_event_types}): pass "
                                 f"types of the items' shape {tuple(items.shape)}, got {got}")
            x = x + self.type_emb(types)  # (B, T, D); callers map types the model never saw to 0
        x = self.drop(x) * keep.unsqueeze(-1)  # (B, T, D) padded slots carry nothing
        mask = self._attention_mask(keep)  # (B, 1, T, T)
        for i, block in enumerate(self.blocks):
            # Only the last position of the last block is needed for user vectors.
            x = block(x, mask, last_only=last_only and i == len(self.blocks) - 1)  # (B, T or 1, D)
        return self.norm(x)  # (B, T or 1, D)

    def _attention_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) bool: key is real (and not in the future if causal); the diagonal is always allowed
        so that a fully padded row still has one key and softmax gives no NaN."""
        t = keep.shape[1]
        eye = torch.eye(t, dtype=torch.bool, device=keep.device)  # (T, T)
        mask = keep[:, None, None, :]  # (B, 1, 1, T)
        if self.causal:
            mask = mask & torch.ones_like(eye).tril()  # (B, 1, T, T)
        return mask | eye  # (B, 1, T, T)

    def item_embeddings(self) -> torch.Tensor:
        """(n_items + 1, D) item table; row 0 is padding and must be ignored when ranking. No [MASK] row.
        With item attributes each row is the id embedding plus the item's attribute vector."""
        return self._rows(slice(0, self.n_items + 1))  # (I + 1, D)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) int -> (..., D): rows of the item table (the [MASK] token and padding included)."""
        if self.item_feature_ids is None:
            return self.item_emb(items)  # (..., D)
        if self.item_emb.num_embeddings <= items.numel():
            # one attribute sum per catalogue row is less work than one per position (same values)
            return F.embedding(items, self._rows(slice(None)))  # (..., D)
        return self._rows(items.reshape(-1)).view(*items.shape, -1)  # (..., D)

    def _rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """(R, D) item vectors of the item-table ``rows``: the id row (times 0 for an item scored by its
        attributes alone) plus the attribute vector."""
        table = self.item_emb.weight[rows]  # (R, D)
        if self.item_feature_ids is None or self.item_feature_weights is None or self.item_id_weights is None:
            return table
        ids = table * self.item_id_weights[rows].unsqueeze(-1).to(table)
        return ids + self._attributes(self.item_feature_ids[rows], self.item_feature_weights[rows])

    def _attributes(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(N, S) value ids and weights -> (N, D) weighted sums of value embeddings (0 for no value)."""
        assert self.feature_emb is not None
        return F.embedding_bag(ids, self.feature_emb.weight, per_sample_weights=weights.to(self.feature_emb.weight),
                               mode="sum", padding_idx=PAD)

    @property
    def n_feature_values(self) -> int:
        return 0 if self.feature_emb is None else self.feature_emb.num_embeddings - 1

    def set_item_features(self, ids: torch.Tensor, columns: torch.Tensor, trained: torch.Tensor | None = None) -> None:
        """Set the item -> attribute table: ``ids`` (n_items + 1, S) value ids (1..n_feature_values, 0 = none;
        row = item index, row 0 padding), ``columns`` (n_feature_values + 1,) the attribute column of each
        value (entry 0 ignored) and ``trained`` (n_items + 1,) bool, False for items with no training event,
        which are scored by their attributes alone (None: every item uses its id embedding). Raises ValueError
        on a shape or a value out of range."""
        if self.item_feature_ids is None or self.item_feature_weights is None or self.item_id_weights is None:
            raise ValueError("this model has no item attributes (n_feature_values = 0)")
        n, slots = self.n_items + 1, self.item_feature_ids.shape[1]
        if ids.shape != (n, slots) or columns.shape != (self.n_feature_values + 1,):
            raise ValueError(f"item features of shape {tuple(ids.shape)} with {columns.numel() - 1} values do not "
                             f"fit this model ({n} x {slots} slots, {self.n_feature_values} values)")
        if int(ids.min()) < 0 or int(ids.max()) > self.n_feature_values or bool((ids[PAD] != PAD).any()):
            raise ValueError(f"item feature ids must lie in 0..{self.n_feature_values}, with none on padding")
        ids = ids.long().to(self.item_feature_ids.device)
        col = columns.long().to(ids.device)[ids]  # (I + 1, S) column of each slot's value (0 for no value)
        real = ids != PAD
        counts = torch.zeros(n, int(columns.max()) + 1, device=ids.device)  # (I + 1, C + 1) values per column
        counts.scatter_add_(1, col, real.float())
        per_column = counts.gather(1, col).clamp(min=1)  # (I + 1, S) values of the same column on the item
        if trained is not None and trained.shape != (n,):
            raise ValueError(f"trained has shape {tuple(trained.shape)}, expected ({n},)")
        with torch.no_grad():
            self.item_feature_ids[:n] = ids
            self.item_feature_weights[:n] = real / per_column
            self.item_id_weights[:n] = 1.0 if trained is None else trained.to(self.item_id_weights)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., D) -> (..., n_items + 1) dot-product scores against every item ([MASK] is no item)."""
        return hidden @ self.item_embeddings().T  # (..., I + 1)

    @property
    def repeat_bias(self) -> bool:
        return self.repeat_weight is not None

    def history_bias(
        self, items: torch.Tensor, all_positions: bool = False, types: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The repeat bias of the window ``items`` (B, T) (left-padded), None without ``repeat_bias``.

        At the last position: values (B, T), ``w[T - 1 - s]`` for the item in column s (0 for padding), to add
        to that item's score. ``all_positions``: values (B, T, T), ``[b, t, s] = w[t - s]`` for the item in
        column s when position t is scored (0 where s > t: the future, and for padding). A model with event
        types adds ``u[types[b, s]]``, the bonus of that event's type (u[0] = 0), wherever ``w`` counts.
        """
        if self.repeat_weight is None:
            return None
        t = items.shape[1]
        real = items != PAD  # (B, T)
        col = torch.arange(t, device=items.device)  # (T,)
        by_type = self._type_bonus(types, real)  # (B, T) or None
        if not all_positions:
            values = self.repeat_weight[t - 1 - col].unsqueeze(0) * real  # (B, T)
            return values if by_type is None else values + by_type
        dist = col[:, None] - col[None, :]  # (T, T) t - s
        values = self.repeat_weight[dist.clamp(min=0)] * (dist >= 0)  # (T, T)
        values = values.unsqueeze(0) * real[:, None, :]  # (B, T, T)
        return values if by_type is None else values + by_type[:, None, :] * (dist >= 0)

    def _type_bonus(self, types: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor | None:
        """(B, T) the repeat bonus of each window event's type (0 for type 0 and padding); None without."""
        if self.repeat_type_weight is None:
            return None
        if types is None or types.shape != real.shape:
            raise ValueError(f"this model's repeat bias depends on event types: pass types of the items' shape "
                             f"{tuple(real.shape)}")
        table = torch.cat([self.repeat_type_weight.new_zeros(1), self.repeat_type_weight])  # (n_types + 1,)
        return table[types] * real  # (B, T)

    def scores(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """items: (B, T) left-padded history (``types`` its events' types, as in :meth:`forward`) -> (B,
        n_items + 1) scores of the next item: ``score(user_vectors)`` plus, with ``repeat_bias``, each window
        item's :meth:`history_bias` (repeats summed)."""
        return self.add_history_bias(self.score(self.user_vectors(items, types)), items, types)  # (B, I + 1)

    def add_history_bias(self, scores: torch.Tensor, items: torch.Tensor, types: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """scores (B, n_items + 1) of the window ``items`` (B, T) (``types`` their events' types) plus each
        window item's :meth:`history_bias` (repeats summed); ``scores`` unchanged without ``repeat_bias``."""
        return _add_bias(scores, items, self.history_bias(items, types=types))

    def repeat_parameters(self) -> list[nn.Parameter]:
        """The repeat-bias weights (by distance, and by event type with event types); empty without."""
        return [p for p in (self.repeat_weight, self.repeat_type_weight) if p is not None]

    def user_vectors(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """items: (B, T) left-padded history (``types`` its events' types, as in :meth:`forward`) -> (B, D).

        Causal: the hidden state at the last position (= ``forward(items)[:, -1]``). Bidirectional: a [MASK]
        (of type 0) is appended after the history (the oldest column dropped if that exceeds ``max_len``) and
        its hidden state is returned, i.e. the state that predicts the next item.
        """
        if self.mask_token is not None:
            mask = torch.full_like(items[:, :1], self.mask_token)  # (B, 1)
            items = torch.cat([items, mask], 1)[:, -self.max_len:]  # (B, min(T + 1, max_len))
            if types is not None:
                types = torch.cat([types, torch.zeros_like(types[:, :1])], 1)[:, -self.max_len:]
        return self._encode(items, last_only=True, types=types)[:, -1]  # (B, D)


class SASRecEnsemble(nn.Module):
    """``members`` independently initialised :class:`SASRec` networks of one configuration (``kwargs``), each with
    its own item table, positions and blocks; an item's score is the MEAN of the members' scores.

    That mean is one wider dot product, so evaluation, FAISS candidates and serving use the ensemble as they use
    a SASRec: :meth:`user_vectors` (B, K*D) are the members' user vectors concatenated and divided by K, and
    :meth:`item_embeddings` (n_items + 1, K*D) the members' tables concatenated. Training
    (:class:`recsys.system.SASRecSystem`) gives each member its own loss, as if it were trained alone. Item
    attributes, event types and the repeat bias are each member's own (its own attribute-value and type tables,
    its own repeat weights): the joined vectors carry the members' attribute parts, every member reads the
    events' types, and the ensemble's repeat bias is the mean of the members' biases, so :meth:`scores` is
    the mean of the members' ``scores`` in every case.
    """

    def __init__(self, members: int, **kwargs: Any) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}; use SASRec for one")
        # One after another from the seeded RNG: every member starts from different weights.
        self.members = nn.ModuleList(SASRec(**kwargs) for _ in range(members))
        first: SASRec = self.members[0]
        self.kwargs: dict[str, Any] = {**first.kwargs, "ensemble": members}
        self.n_items, self.max_len, self.attention = first.n_items, first.max_len, first.attention
        self.causal, self.mask_token = first.causal, first.mask_token
        self.n_event_types, self.n_feature_values = first.n_event_types, first.n_feature_values
        self.repeat_bias = first.repeat_bias
        # The tables and weights are the members' (``members[i].type_emb`` ...), none is the ensemble's own.
        self.repeat_weight = self.repeat_type_weight = self.feature_emb = self.type_emb = None

    def forward(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """items: (B, T) -> (B, T, K*D) the members' hidden states concatenated and divided by K: ``score`` of it
        is the mean of the members' scores at every position (without their repeat bias)."""
        return self._joined([m(items, types) for m in self.members])

    def user_vectors(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """items: (B, T) left-padded history -> (B, K*D), the members' user vectors concatenated, divided by K."""
        return self._joined([m.user_vectors(items, types) for m in self.members])

    def _joined(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(vectors, dim=-1) / len(vectors)  # (..., K*D)

    def item_embeddings(self) -> torch.Tensor:
        """(n_items + 1, K*D) the members' item tables side by side; row 0 is padding. No [MASK] row."""
        return torch.cat([m.item_embeddings() for m in self.members], dim=-1)  # (I + 1, K*D)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., K*D) -> (..., n_items + 1): the mean of the members' scores for :meth:`user_vectors`."""
        return hidden @ self.item_embeddings().T  # (..., I + 1)

    def scores(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """items: (B, T) left-padded history (``types`` its events' types) -> (B, n_items + 1) the mean of the
        members' :meth:`SASRec.scores` of the next item (their repeat bias included)."""
        return self.add_history_bias(self.score(self.user_vectors(items, types)), items, types)  # (B, I + 1)

    def history_bias(self, items: torch.Tensor, all_positions: bool = False, types: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
        """The mean of the members' :meth:`SASRec.history_bias` (same shapes), None without ``repeat_bias``."""
        if not self.repeat_bias:
            return None
        return torch.stack([m.history_bias(items, all_positions, types) for m in self.members]).mean(0)

    def add_history_bias(self, scores: torch.Tensor, items: torch.Tensor, types: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """As :meth:`SASRec.add_history_bias`, with the members' mean bias."""
        return _add_bias(scores, items, self.history_bias(items, types=types))

    def repeat_parameters(self) -> list[nn.Parameter]:
        """The members' repeat-bias weights (empty without ``repeat_bias``)."""
        return [p for m in self.members for p in m.repeat_parameters()]

    def set_item_features(self, ids: torch.Tensor, columns: torch.Tensor, trained: torch.Tensor | None = None) -> None:
        """:meth:`SASRec.set_item_features` on every member (each has its own attribute-value table)."""
        for member in self.members:
            member.set_item_features(ids, columns, trained)


def _add_bias(scores: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``scores`` (B, n_items + 1) plus ``bias`` (B, T) on the columns of the window ``items`` (B, T), repeats
    summed; ``scores`` unchanged when ``bias`` is None."""
    if bias is None:
        return scores
    return scores.scatter_add(1, items.long(), bias.to(scores.dtype))  # padding lands on column 0 with 0


def _init_weights(module: nn.Module) -> None:
    # Small normal init (GPT-2 style): with the tied output table, unit-variance embeddings would give
    # initial logits of variance D and a needlessly peaked softmax.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# What a damaged file of a model directory asks for (load_model here, its id maps in recsys.candidates).
MODEL_FIX = "rerun `recsys train` (or point train.init_from / candidates.model at an intact model)"


def save_model(model: SASRec | SASRecEnsemble, path_dir: str | Path) -> None:
    """Write ``model.pt`` (state dict) and ``model.json`` (constructor kwargs, with ``ensemble: K`` for an
    ensemble) into ``path_dir``."""
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # serialised first: a full disk is then an OSError (ENOSPC), not torch's zip-writer error
    torch.save(model.state_dict(), buffer)
    (path_dir / WEIGHTS_FILE).write_bytes(buffer.getbuffer())
    write_json(path_dir / KWARGS_FILE, model.kwargs)


def load_model(path_dir: str | Path, map_location: str | torch.device = "cpu") -> SASRec | SASRecEnsemble:
    """Rebuild a :class:`SASRec` (a :class:`SASRecEnsemble` if ``model.json`` has ``ensemble``) written by
    :func:`save_model`, in eval mode.

    Raises ``FileNotFoundError`` naming the missing file. ``model.json`` of older versions (``causal: true``
    instead of ``attention``) still loads.
    """
    path_dir = Path(path_dir)
    weights = path_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: {path_dir} is not a trained model directory; run "
                                "`recsys train` first, or check the path given as train.init_from, candidates.model "
                                "or --model")
    kwargs = read_json(path_dir / KWARGS_FILE, MODEL_FIX)
    if "causal" in kwargs:
        if not kwargs.pop("causal"):
            raise ValueError(f"{path_dir / KWARGS_FILE}: 'causal: false' models (no [MASK] token) are no "
                             "longer supported; retrain with model.attention=bidirectional")
        kwargs["attention"] = "causal"
    members = kwargs.pop("ensemble", 1)
    try:
        model = SASRec(**kwargs) if members == 1 else SASRecEnsemble(members, **kwargs)
    except (TypeError, ValueError) as exc:  # keys missing or unknown: not the file save_model writes
        raise damaged(path_dir / KWARGS_FILE, exc, MODEL_FIX) from None
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        if not_damage(exc) or isinstance(exc, torch.OutOfMemoryError) or "CUDA" in str(exc):
            raise  # not the file's bytes: a permission, the device's memory
        raise damaged(weights, exc, MODEL_FIX) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # other shapes or keys than model.json describes
        raise damaged(weights, exc, f"its weights do not fit {path_dir / KWARGS_FILE}; {MODEL_FIX}") from None
    return model.to(map_location).eval()
