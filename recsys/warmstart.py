"""Warm start (``train.init_from``): a new model starts from an earlier model's weights instead of a random
initialisation, for nightly retraining on a catalogue that has grown or changed since.

Every weight but the item table is copied as is, so the architecture must be the same (the model keys of
:data:`SAME_ARCHITECTURE`; dropout may differ). Item rows are matched by EXTERNAL ``item_id`` through both
id maps: an item the earlier model knew starts from its old row, an item it never saw keeps the random
initialisation of the new model (seeded by ``train.seed``), and an old item missing from the current
features is left out. Optimiser state is not carried over: training starts a fresh AdamW.

Item attributes (``model.item_features``): both models must have them or neither. Their value embeddings are
matched like items, by (column, value) through both models' ``item_feature_values`` tables: a value seen
before starts from its old row, a new one from the fresh init; the item -> values table is tonight's.

Event types (``model.event_types``): their embeddings are matched by type name through both models'
``event_types`` tables; a type the earlier model did not embed (or all of them, if it embedded none) starts from
the fresh init, and an earlier model's types are simply left out when tonight's model embeds none.

Shrink and perturb (Ash & Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020): with
``train.init_shrink`` = s and ``train.init_perturb`` = p, every carried-over weight becomes
``s * earlier + p * fresh``, fresh = the new model's own seeded initialisation (s = 1, p = 0: a plain copy).
Shrinking towards and mixing in a fresh init is their remedy for the generalisation a warm-started network
loses against one trained from scratch. New items keep their fresh rows as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl
import torch

from features import schema
from recsys.candidates import TrainedModel
from recsys.config import ConfigError
from recsys.model import PAD, SASRec, SASRecEnsemble

# model.json keys that fix the shape or meaning of a weight other than the item table.
SAME_ARCHITECTURE = ("max_len", "hidden", "n_blocks", "n_heads", "attention", "ffn_mult", "block", "repeat_bias")
_ABSENT = {"repeat_bias": False}  # model.json holds this key only when it is set
# weights matched by id (items, attribute values) or taken from tonight's model rather than copied as they are
_TONIGHT = ("item_feature_ids", "item_feature_weights", "item_id_weights")
_REMAPPED = ("item_emb.weight", "feature_emb.weight", "type_emb.weight", "repeat_type_weight", *_TONIGHT)


@dataclass(frozen=True)
class WarmStart:
    """An earlier model (``source``, with the id maps it was trained with), where it came from (``spec``:
    the ``train.init_from`` value), and the CURRENT features' item map (schema.ITEM_MAP)."""

    source: TrainedModel
    spec: str
    item_map: pl.DataFrame
    shrink: float = 1.0
    perturb: float = 0.0
    feature_values: pl.DataFrame | None = None  # the current features' schema.ITEM_FEATURE_VALUES, if any
    event_types: pl.DataFrame | None = None  # the current features' schema.EVENT_TYPE_MAP, if any

    def apply(self, model: SASRec) -> dict[str, int | float]:
        """Load the source's weights into ``model`` (in place; its item rows by ``item_id``) and return the
        counts for the train report: ``items_from_source``, ``items_new``, ``source_items_dropped``, with the
        ``shrink`` and ``perturb`` factors used.

        An ensemble (``model.ensemble`` K) starts member by member from an earlier ensemble of K members.

        Raises ConfigError naming ``train.init_from`` and every architecture key that differs.
        """
        old = self.source.model
        k_there, k_here = old.kwargs.get("ensemble", 1), model.kwargs.get("ensemble", 1)
        if k_there != k_here:
            raise ConfigError(f"train.init_from ({self.spec}): the earlier model has model.ensemble={k_there}, this "
                              f"one {k_here}; set model.ensemble={k_there}, or train from scratch with "
                              "train.init_from=null")
        if isinstance(model, SASRecEnsemble):  # member i from the earlier member i, each as a model of its own
            assert isinstance(old, SASRecEnsemble)
            counts = [replace(self, source=replace(self.source, model=earlier)).apply(member)
                      for earlier, member in zip(old.members, model.members, strict=True)]
            return counts[0]  # the same item maps: the same counts for every member
        there = {k: old.kwargs.get(k, _ABSENT.get(k)) for k in SAME_ARCHITECTURE}
        here = {k: model.kwargs.get(k, _ABSENT.get(k)) for k in SAME_ARCHITECTURE}
        differ = [f"model.{k} is {there[k]!r} there, {here[k]!r} here" for k in SAME_ARCHITECTURE
                  if there[k] != here[k]]
        if differ:
            raise ConfigError(f"train.init_from ({self.spec}): the earlier model has another architecture ("
                              + "; ".join(differ) + "); set those keys to the earlier model's values, or "
                              "train from scratch with train.init_from=null")
        # the earlier model's ids in tonight's id dtype (data.item_id_type may have changed in between)
        source_ids = schema.with_id_dtype(self.source.item_map, schema.ITEM_ID, self.item_map.schema[schema.ITEM_ID])
        if same := schema.merged_ids(self.source.item_map, source_ids, schema.ITEM_ID):  # '7', '07': one id now
            raise ConfigError(f"train.init_from ({self.spec}): the earlier model's text item ids {same} are one "
                              f"{source_ids.schema[schema.ITEM_ID]} id tonight (data.item_id_type changed), so its "
                              "rows cannot be matched "
                              "to items; set data.item_id_type as then, or train from scratch with "
                              "train.init_from=null")
        pairs = self.item_map.select(schema.ITEM_ID, schema.ITEM_IDX).join(
            source_ids.select(schema.ITEM_ID, pl.col(schema.ITEM_IDX).alias("source_idx")),
            on=schema.ITEM_ID, how="inner",
        )
        new_idx = pairs[schema.ITEM_IDX].to_torch().long()
        old_idx = pairs["source_idx"].to_torch().long()
        self._check_attributes(old, model)
        fresh = model.state_dict()
        state = {k: self._blend(v.to(fresh[k]), fresh[k])
                 for k, v in old.state_dict().items() if k not in _REMAPPED}
        values: dict[str, int] = {}
        if model.feature_emb is not None:
            state |= {k: fresh[k] for k in _TONIGHT}  # tonight's attributes
            state["feature_emb.weight"], matched = self._feature_table(old, model)
            values = {"values_from_source": matched, "values_new": model.n_feature_values - matched}
        if model.type_emb is not None:
            type_pairs = self._type_pairs(old)
            source = None if old.type_emb is None else old.type_emb.weight
            state["type_emb.weight"] = self._type_rows(source, model.type_emb.weight, type_pairs)
            if model.repeat_type_weight is not None:  # by type name too: row r of the bonus is type r + 1
                state["repeat_type_weight"] = self._type_rows(
                    old.repeat_type_weight, model.repeat_type_weight, type_pairs, offset=1)
            matched = 0 if type_pairs is None else len(type_pairs[0])
            values |= {"event_types_from_source": matched, "event_types_new": model.n_event_types - matched}
        with torch.no_grad():
            table = model.item_emb.weight.detach().clone()  # (I + 1 [+ 1 MASK], D): new items keep their init
            source = old.item_emb.weight.detach().to(table)
            table[new_idx] = self._blend(source[old_idx], table[new_idx])
            table[PAD] = 0.0
            if model.mask_token is not None:  # bidirectional: the [MASK] row is a learned token too
                table[model.mask_token] = self._blend(source[old.mask_token], table[model.mask_token])
        model.load_state_dict({**state, "item_emb.weight": table}, strict=True)
        return {
            "items_from_source": pairs.height,
            "items_new": model.n_items - pairs.height,
            "source_items_dropped": old.n_items - pairs.height,
            "shrink": self.shrink,
            "perturb": self.perturb,
            **values,
        }

    def _check_attributes(self, old: SASRec, model: SASRec) -> None:
        """Raise ConfigError naming the keys when one model has item attributes and the other has not."""
        if bool(old.n_feature_values) != bool(model.n_feature_values):
            there, here = ("with" if n else "without" for n in (old.n_feature_values, model.n_feature_values))
            raise ConfigError(f"train.init_from ({self.spec}): the earlier model was trained {there} item attributes "
                              f"and this one is {here} them (data.item_features, model.item_features); make both "
                              "the same, or train from scratch with train.init_from=null")
        if model.n_feature_values and (self.source.feature_values is None or self.feature_values is None):
            raise ConfigError(f"train.init_from ({self.spec}): the earlier model directory has no "
                              f"{schema.ITEM_FEATURE_FILES['item_feature_values']} to match its attribute values by; "
                              "train from scratch with train.init_from=null")

    def _feature_table(self, old: SASRec, model: SASRec) -> tuple[torch.Tensor, int]:
        """Tonight's value embeddings, rows of values the earlier model knew (same column and text) from it, and
        how many those are."""
        assert self.feature_values is not None and self.source.feature_values is not None
        pairs = self.feature_values.join(self.source.feature_values.select(
            "column", "value", pl.col(schema.FEATURE_IDX).alias("source_idx")), on=["column", "value"])
        new_idx = pairs[schema.FEATURE_IDX].to_torch().long()
        old_idx = pairs["source_idx"].to_torch().long()
        assert model.feature_emb is not None and old.feature_emb is not None
        with torch.no_grad():
            table = model.feature_emb.weight.detach().clone()  # (V + 1, D): new values keep their init
            source = old.feature_emb.weight.detach().to(table)
            table[new_idx] = self._blend(source[old_idx], table[new_idx])
            table[PAD] = 0.0
        return table, pairs.height

    def _type_pairs(self, old: SASRec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tonight's type_idx, the earlier model's type_idx) of the types both have (by name); None if the
        earlier model has no types."""
        if not old.n_event_types or self.source.event_types is None or self.event_types is None:
            return None
        pairs = self.event_types.join(self.source.event_types.select(
            schema.EVENT_TYPE, pl.col(schema.TYPE_IDX).alias("source_idx")), on=schema.EVENT_TYPE)
        return pairs[schema.TYPE_IDX].to_torch().long(), pairs["source_idx"].to_torch().long()

    def _type_rows(self, source: torch.Tensor | None, fresh: torch.Tensor,
                   pairs: tuple[torch.Tensor, torch.Tensor] | None, offset: int = 0) -> torch.Tensor:
        """``fresh`` (a per-type weight of tonight's model; row = type_idx - ``offset``) with the rows of the
        ``pairs`` taken from the earlier model's ``source``; new types keep their fresh rows."""
        table = fresh.detach().clone()
        if source is None or pairs is None:
            return table
        new_idx, old_idx = pairs[0] - offset, pairs[1] - offset
        with torch.no_grad():
            table[new_idx] = self._blend(source.detach().to(table)[old_idx], table[new_idx])
        return table

    def _blend(self, earlier: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """``shrink * earlier + perturb * fresh`` for floating-point weights (exactly ``earlier`` by default)."""
        if not earlier.is_floating_point() or (self.shrink == 1.0 and self.perturb == 0.0):
            return earlier
        return self.shrink * earlier + self.perturb * fresh
