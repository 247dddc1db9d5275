"""Typed, frozen configuration loaded from YAML under ``conf/`` plus ``key=value`` overrides.

Every section rejects unknown keys and wrong types; the error names the key path and the file.
The defaults below are the documented defaults; ``conf/base.yaml`` lists them all (a test keeps the two equal).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# `recsys … --quiet` (only warnings and the final summary on the console) sets this for the job's call and the DDP
# processes Lightning's launcher starts from it: no progress bar, whatever train.progress says. An environment
# variable rather than a config key, so that --quiet changes no config hash (train.progress is part of the run's).
QUIET_VARIABLE = "RECSYS_QUIET"


def quiet_console() -> bool:
    return os.environ.get(QUIET_VARIABLE) == "1"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path and the source."""


def _numeric(annotation: Any) -> bool:
    """Whether a field of this annotation takes a number (int or float, optionally None) and no bool."""
    args = typing.get_args(annotation) or (annotation,)
    return bool({int, float} & set(args)) and bool not in args


class _Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf / .nan are floats, but no float key of the config means anything with them
    # (train.max_time_s=.inf would crash training's timer); they fail here as "should be a finite number".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads true/false/yes/no/on/off as booleans, which pydantic would take as 1 / 0 for a number."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if isinstance(value, bool) and _numeric(field.annotation):
            raise ValueError(f"must be a number, got {value!r} (YAML reads true/false/yes/no/on/off as booleans)")
        # the numbers of a collection (evaluate.ks: [true, 10], train.type_weights: {buy: yes}) likewise
        inner = typing.get_args(field.annotation)
        if isinstance(value, list | tuple) and inner and _numeric(inner[0]):
            items = value
        elif isinstance(value, dict) and len(inner) == 2 and _numeric(inner[1]):
            items = list(value.values())
        else:
            return value
        if any(isinstance(v, bool) for v in items):
            raise ValueError(f"must hold numbers, got {value!r} (YAML reads true/false/yes/no/on/off as booleans)")
        return value


def _check_device(value: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is None:
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (N = a GPU index), got {value!r}")
    return value


# Where a job runs the model: auto = CUDA when torch sees a GPU, else CPU; cuda / cuda:N fail at the start of
# the job when there is no such GPU (recsys.device.resolve_device).
Device = Annotated[str, AfterValidator(_check_device)]


def _expand_user(path: str) -> str:
    """``~`` / ``~user`` at the start of a path is the home directory, as a shell reads it: Python's paths keep it
    literally (a directory named ``~`` under the current one) while Polars expands it, so a job half wrote into
    one and read from the other."""
    return os.path.expanduser(path) if path.startswith("~") else path


# A file or directory path of the config: ~ expanded; relative paths are relative to the current directory.
PathText = Annotated[str, AfterValidator(_expand_user)]


class SyntheticConfig(_Section):
    """Demo event generator with a planted sequential pattern and a Zipf popularity skew."""

    n_users: int = Field(2000, ge=10)
    n_items: int = Field(400, ge=20)
    min_len: int = Field(15, ge=3)
    max_len: int = Field(60, ge=3)
    follow_prob: float = Field(0.75, ge=0.0, le=1.0)
    zipf_exponent: float = Field(1.1, ge=0.0)
    duplicate_rate: float = Field(0.01, ge=0.0, le=0.5)
    seed: int = 7

    @model_validator(mode="after")
    def _lengths(self) -> SyntheticConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"data.synthetic.min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        return self


def _numbers_as_text(value: Any) -> Any:
    """Column names and event types written as numbers (`data.user_col=1` for a header of numbers,
    `features.event_types=[1, 4]` for type codes, `train.type_weights={1: 2.0}`) are their text: YAML reads them
    as numbers. Leading zeros are gone by then (`01` is 1): quote such names. Applied to a value, the items of a
    list and the keys of a mapping; a non-finite float (YAML's .inf, .nan) is left to fail as no text."""
    def text(item: Any) -> Any:
        if isinstance(item, bool) or not isinstance(item, int | float):
            return item
        return str(item) if math.isfinite(item) else item

    if isinstance(value, list | tuple):
        return [text(item) for item in value]
    if isinstance(value, dict):
        named = {text(key): item for key, item in value.items()}
        if len(named) < len(value):  # {1: 2.0, '1': 3.0}: one name twice
            raise ValueError(f"names one key twice, as a number and as text: {sorted(map(str, value))}")
        return named
    return text(value)


class ItemFeaturesConfig(_Section):
    """A table of item attributes (category, brand, genres, ...) that the model embeds beside each item's id:
    one row per item (a repeated item's rows are merged), every listed column categorical."""

    # CSV with a header (or Parquet, by the .parquet suffix): an item id column and the attribute columns.
    path: PathText
    item_col: str = "item_id"
    columns: tuple[str, ...] = Field(min_length=1)
    _names = field_validator("item_col", "columns", mode="before")(lambda value: _numbers_as_text(value))
    # CSV field separator.
    separator: str = Field(",", min_length=1, max_length=1)
    # Text that holds several values per cell, e.g. "|" for MovieLens genres ("Action|Comedy"); None = one
    # value per cell.
    list_separator: str | None = Field(None, min_length=1)
    # Items of the file (with at least one value) join the catalogue even without an event, scored by their
    # attributes alone: new arrivals can be recommended before anyone has interacted with them.
    cold_items: bool = False
    # At most this many values per item and column (the first in file order; the rest dropped and counted):
    # the model holds an items x values table, so a column of hundreds of tags per item would blow it up.
    max_values: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _columns(self) -> ItemFeaturesConfig:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"data.item_features.columns lists a column twice: {list(self.columns)}")
        if self.item_col in self.columns:
            raise ValueError(f"data.item_features.columns holds the item id column {self.item_col!r} "
                             "(data.item_features.item_col); list only attribute columns")
        return self


class DataConfig(_Section):
    """Where the events come from and how to read them."""

    _names = field_validator("path", "user_col", "item_col", "timestamp_col", "event_type_col", "weight_col",
                             "timestamp_format", "separator", "quote_char", "columns",
                             mode="before")(lambda value: _numbers_as_text(value))

    source: Literal["file", "synthetic"] = "file"
    path: PathText = "events.csv"
    format: Literal[
        "csv", "parquet", "movielens_dat", "movielens_udata", "movielens_csv", "pairs", "sequence_lines"
    ] = "csv"
    user_col: str = "user_id"
    item_col: str = "item_id"
    # Id types: int = whole numbers (stored Int64), string = any text such as SKUs or UUIDs (stored String,
    # surrounding whitespace stripped). Every table the pipeline writes keeps the ids in this type.
    user_id_type: Literal["int", "string"] = "int"
    item_id_type: Literal["int", "string"] = "int"
    timestamp_col: str | None = "timestamp"
    event_type_col: str | None = None
    weight_col: str | None = None
    timestamp_format: str | None = None
    separator: str = Field(",", min_length=1, max_length=1)
    # csv: the character that quotes a field holding separators or line breaks (a quote inside one is doubled);
    # null = no quoting, every quote character is text (an export that never quotes but has `55" TV` in a field)
    quote_char: str | None = Field('"', min_length=1, max_length=1)
    # csv without a header line: the names of its columns in order (the first line is then an event); null = the
    # first line is the header
    columns: tuple[str, ...] | None = Field(None, min_length=1)
    synthetic: SyntheticConfig = SyntheticConfig()
    # Optional item attributes for the model (model.item_features); None = ids only.
    item_features: ItemFeaturesConfig | None = None

    @model_validator(mode="after")
    def _distinct_columns(self) -> DataConfig:
        """One file column fills one role: ``data.item_col=user_id`` (a typo) would build every user's sequence
        of itself."""
        if self.columns is not None:  # (read by data.format=csv only: Config.ignored() names it otherwise)
            repeated = sorted({c for c in self.columns if self.columns.count(c) > 1})
            if repeated:
                raise ValueError(f"data.columns names {repeated} more than once: give each column its own name")
        if self.format not in ("csv", "parquet"):
            return self  # the other formats name their fields themselves
        roles: dict[str, list[str]] = {}
        for key in ("user_col", "item_col", "timestamp_col", "event_type_col", "weight_col"):
            if (column := getattr(self, key)) is not None:
                roles.setdefault(column, []).append(f"data.{key}")
        clash = {column: keys for column, keys in roles.items() if len(keys) > 1}
        if clash:
            column, keys = next(iter(clash.items()))
            raise ValueError(f"{' and '.join(keys)} both name the column {column!r}: each role needs its own column; "
                             "set them to the file's columns")
        return self


class FeaturesConfig(_Section):
    """Row policies, k-core filter and the split."""

    _types = field_validator("event_types", mode="before")(lambda value: _numbers_as_text(value))

    event_types: tuple[str, ...] | None = Field(None, min_length=1)  # [] would keep no event: null keeps all
    dedup: Literal["none", "exact", "user_item"] = "exact"
    min_user_events: int = Field(1, ge=1)
    min_item_events: int = Field(1, ge=1)
    split: Literal["leave_one_out", "time"] = "leave_one_out"
    val_cutoff: int | None = None
    test_cutoff: int | None = None
    # Per-user limits, after the event-type filter and dedup, before the k-core (dropped rows counted): users
    # with more events than max_user_events are dropped whole (bots, crawlers, shared accounts), and only each
    # user's newest keep_last_events events are kept. None = no limit.
    max_user_events: int | None = Field(None, ge=1)
    keep_last_events: int | None = Field(None, ge=1)
    # > 1: out of core, the events split into this many user ranges processed one at a time (features.build)
    partitions: int = Field(1, ge=1)
    # Input gate, for unattended nightly builds (a failure is exit 3 and keeps the previous features): the
    # input must hold at least this share of the rows of the previous build in this work directory (a
    # truncated export); None = no check. The first build has nothing to compare with and passes.
    min_rows_ratio: float | None = Field(None, gt=0.0, le=1.0)
    # ... and its newest event must be at most this old at the END of the run date (UTC; --run-date of
    # `recsys run`, else today), in the timestamps' unit (epoch seconds: 172800 = 2 days): a stale export.
    max_event_age: int | None = Field(None, ge=0)
    # The window of history the features keep: events older than the END of the run date minus this, in epoch
    # seconds (7776000 = 90 days; millisecond timestamps are refused), are dropped (counted as older_than_history), so
    # reading years of partitions still builds (and trains on) a bounded recent window; None = all history.
    max_history_age: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _user_limits(self) -> FeaturesConfig:
        if self.max_user_events is not None and self.min_user_events > self.max_user_events:
            raise ValueError(f"features.min_user_events ({self.min_user_events}) is above features."
                             f"max_user_events ({self.max_user_events}): no user could be kept; lower the first "
                             "or raise the second")
        if self.keep_last_events is not None and self.min_user_events > self.keep_last_events:
            raise ValueError(f"features.min_user_events ({self.min_user_events}) is above features."
                             f"keep_last_events ({self.keep_last_events}): each user keeps at most that many events "
                             "before the k-core, so no user could be kept; lower the first or raise the second")
        return self

    @model_validator(mode="after")
    def _cutoffs(self) -> FeaturesConfig:
        if self.split != "time" and (self.val_cutoff is not None or self.test_cutoff is not None):
            raise ValueError(f"features.val_cutoff and features.test_cutoff apply to features.split=time only (split "
                             f"is {self.split!r}, which ignores them): set features.split=time or both cutoffs to null")
        if self.split == "time":
            if self.val_cutoff is None or self.test_cutoff is None:
                raise ValueError("split 'time' needs features.val_cutoff and features.test_cutoff (timestamps)")
            if self.val_cutoff > self.test_cutoff:
                raise ValueError(f"features.val_cutoff ({self.val_cutoff}) must not be after features.test_cutoff "
                                 f"({self.test_cutoff}): swap them")
        return self


class ModelConfig(_Section):
    """SASRec architecture."""

    max_len: int = Field(50, ge=2)
    hidden: int = Field(64, ge=4)
    n_blocks: int = Field(2, ge=1)
    n_heads: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # causal: SASRec next-item training; bidirectional: BERT4Rec-style masked-item training (train.mask_prob).
    attention: Literal["causal", "bidirectional"] = "causal"
    # Width of each block's position-wise feed-forward layer, in multiples of hidden (SASRec: 1).
    ffn_mult: int = Field(1, ge=1)
    # Transformer block: sasrec (pre-LN, GELU FFN) or ligr (eSASRec's LiGR layer: gated residuals, SwiGLU FFN).
    block: Literal["sasrec", "ligr"] = "sasrec"
    # A learned score bonus per recency for items already in the user's window (SASRec + repeat bias), for
    # domains where users re-consume; causal attention and train.loss=ce only.
    repeat_bias: bool = False
    # Embed the item attributes of the feature set (data.item_features) and add them to each item's id
    # embedding, in the input and in the output table alike; false = ids only, whatever the features hold.
    item_features: bool = True
    # Embed each history event's type (data.event_type_col: view, cart, purchase) and add it to the item's
    # input embedding, as positions are; the ranked items are unchanged. Needs a feature set built from
    # events with a type column (exit 2 otherwise).
    event_types: bool = False
    # K > 1: K independently initialised SASRec networks of this configuration, each trained on its own loss on
    # the same batches, an item scored by the mean of their scores (K times the cost); 1 = one network.
    ensemble: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden % self.n_heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be divisible by model.n_heads ({self.n_heads})")
        return self


class TrainConfig(_Section):
    """Optimisation, early stopping and hardware."""

    loss: Literal["ce", "bce", "sampled_softmax", "gbce"] = "ce"
    n_negatives: int = Field(1, ge=1)
    # sampled_softmax only: how the shared negatives are drawn (log-Q corrected either way).
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    # gbce only: calibration t in [0, 1] (0 = plain BCE, 1 = fully calibrated; gSASRec uses 0.75).
    gbce_t: float = Field(0.75, ge=0.0, le=1.0)
    # ce only: share of the target's probability mass spread uniformly over the catalogue.
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # ce only: loss weight per event type of the TARGET ({buy: 3.0, pv: 0.5}; unlisted types and untyped
    # targets weigh 1): train for what matters most, e.g. purchases. Needs features with event types.
    type_weights: dict[str, float] = Field(default_factory=dict)
    _type_names = field_validator("type_weights", mode="before")(lambda value: _numbers_as_text(value))
    # model.attention=bidirectional only: probability that a train position is replaced by [MASK].
    mask_prob: float = Field(0.2, gt=0.0, lt=1.0)
    # model.attention=causal only: probability that a train INPUT item is dropped for the step (treated as
    # padding: the model reads the history without it; every target stays). The last input of a row is kept.
    item_drop: float = Field(0.0, ge=0.0, lt=1.0)
    # ce + causal only: a training position's softmax leaves out the items the user had already seen up to it
    # (its input window; its own target always competes), as evaluate.exclude_seen leaves them out of the
    # ranking: the model is not trained to push down items it will never be asked to rank. Needs
    # evaluate.exclude_seen=true.
    exclude_seen: bool = False
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1)
    seed: int = 42
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    # DDP: `devices` processes on each of `num_nodes` nodes. batch_size and val_batch_size are GLOBAL (split
    # evenly across the processes), so the optimisation does not change with the device count.
    # strategy auto = no DDP for one process, ddp otherwise.
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp"] = "auto"
    val_batch_size: int = Field(1024, ge=1)
    progress: bool = True
    # Wall-clock budget for training (Lightning's Timer, counted from the start of training, checked after every
    # step): at the limit the running epoch stops after its current batch and is validated; best checkpoint kept.
    max_time_s: float | None = Field(None, gt=0.0)
    # How often last.ckpt (the resume point) is written: None = at the end of every epoch; S = at the end of an
    # epoch once S seconds of training passed since the previous write, and always at the epoch where training
    # stops. Each write is a full checkpoint (weights + optimiser, fsynced: ~70 ms for the ML-1M model on the
    # H100 machine), so with sub-second epochs it is a large share of training; a killed run redoes up to S s.
    checkpoint_interval_s: float | None = Field(None, ge=0.0)
    # Learning rate: linear warm-up over the first warmup_epochs, then constant or cosine decay to 0 at
    # max_epochs (per optimiser step).
    warmup_epochs: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Histories longer than model.max_len + 1: None trains on the last max_len + 1 items of each user only;
    # S (1..model.max_len) also trains on the windows ending S, 2S, ... items earlier, so every train item
    # is a target (S = max_len: exactly once). More rows per epoch.
    window_stride: int | None = Field(None, ge=1)
    # Batches of similar history length: each run of group_by_length x batch_size shuffled rows is sorted by
    # length and cut into batches, and the batches are shuffled. Batches are trimmed to their longest row,
    # so with many short histories an epoch does far less work on padding. None = plain shuffled batches.
    group_by_length: int | None = Field(None, ge=1)
    # Exponential moving average of the weights (Lightning's EMAWeightAveraging, updated after every step):
    # validation, early stopping, checkpoints and the returned model use the averaged weights. None = off.
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    # Training batches padded to model.max_len instead of trimmed to their longest row: every step has the
    # same shape (what torch.compile and CUDA graphs need); more work on padding, the same loss.
    static_shapes: bool = False
    # Each training batch's forward and loss through torch.compile (default mode); the first steps pay the
    # compile time (tens of seconds), and every new batch shape another, so use it with static_shapes. Compiled
    # CE scores every position, padding too: for dense histories (ML-1M), not for short ones (Amazon).
    compile: bool = False
    # torch.compile's mode with compile: "reduce-overhead" also captures the step as CUDA graphs on GPU (the
    # launch overhead of a small model's step; needs static_shapes, else every shape records its own graph).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    # Warm start: begin from an earlier model's weights instead of a random init (recsys/warmstart.py): a local
    # model directory or an MLflow URI (models:/sasrec@champion, models:/sasrec/3). Same architecture needed;
    # items matched by item_id, new items initialised at random. None = from scratch.
    init_from: PathText | None = None
    # Shrink and perturb (Ash & Adams 2020) with init_from: each carried-over weight = init_shrink * earlier +
    # init_perturb * the new model's fresh seeded init. 1 and 0 = a plain copy; no effect without init_from.
    init_shrink: float = Field(1.0, gt=0.0, le=1.0)
    init_perturb: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _loss_options(self) -> TrainConfig:
        if self.label_smoothing > 0 and self.loss != "ce":
            raise ValueError(
                f"train.label_smoothing applies to train.loss=ce only (loss is {self.loss!r}); set it to 0"
            )
        if self.type_weights and self.loss != "ce":
            raise ValueError(f"train.type_weights applies to train.loss=ce only (loss is {self.loss!r}); set it "
                             "to {}")
        bad = {k: v for k, v in self.type_weights.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"train.type_weights must be finite and >= 0, got {bad}")
        if self.negative_sampling != "uniform" and self.loss != "sampled_softmax":
            raise ValueError(
                f"train.negative_sampling={self.negative_sampling} applies to train.loss=sampled_softmax only "
                f"(loss is {self.loss!r}); bce and gbce sample uniformly"
            )
        if self.warmup_epochs > 0 and self.warmup_epochs >= self.max_epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs:g}) must be below train.max_epochs ({self.max_epochs}): "
                "the learning rate would never reach train.lr (nor decay, with lr_schedule=cosine); lower "
                "warmup_epochs or raise max_epochs"
            )
        world = self.devices * self.num_nodes
        for key in ("batch_size", "val_batch_size"):
            if getattr(self, key) < world:
                raise ValueError(
                    f"train.{key} ({getattr(self, key)}) is the global batch, split across train.devices x "
                    f"train.num_nodes = {world} processes; it must be at least {world}"
                )
        return self


# Train keys that do not change a run's trajectory (its time budget, how often its resume point is written):
# hashed as unset in the run's identity (recsys.checkpoint.run_identity) and checkpoint directory
# (pipelines.schedule.checkpoint_dir), so a run stopped under one budget resumes under another.
BUDGET_KEYS = ("max_time_s", "checkpoint_interval_s")


def without_budget(train: dict) -> dict:
    """A copy of a ``train`` config dict with :data:`BUDGET_KEYS` set to None (unset)."""
    return {**train, **dict.fromkeys(BUDGET_KEYS)}


_ABSENT = object()


def non_default(tree: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config dict that differ from ``default`` (the same section's defaults), recursively: what
    a run's identity hashes, so that a key added by an upgrade, at its default, leaves the identity of existing
    runs (their checkpoint directories, done markers) as it was and a run killed before the upgrade resumes
    after it. The price: changing a key's DEFAULT does not change the identity of configs that leave it unset."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        base = default.get(key, _ABSENT)
        if isinstance(value, dict) and isinstance(base, dict):
            if differ := non_default(value, base):
                out[key] = differ
        elif value != base:
            out[key] = value
    return out


class EvaluateConfig(_Section):
    """Offline full-catalogue ranking evaluation."""

    split: Literal["val", "test"] = "test"
    ks: tuple[int, ...] = (10, 20, 50)
    batch_size: int = Field(1024, ge=1)
    # Baselines scored in the same run as the model (recsys/baselines.py).
    # repeat: the user's own items by recency, then popularity (for evaluate.exclude_seen=false).
    baselines: tuple[Literal["popularity", "item_knn", "ease", "repeat"], ...] = ("popularity", "item_knn", "ease")
    # item_knn: neighbours kept per item; history items summed (None = the whole history).
    knn_neighbors: int = Field(100, ge=1)
    knn_history: int | None = Field(None, ge=1)
    # ease: L2 weight lambda; skipped (with a logged reason) on catalogues larger than ease_max_items.
    ease_lambda: float = Field(500.0, gt=0.0)
    ease_max_items: int = Field(20000, ge=1)
    # Model scored in blocks of this many items with a running top-K merge (recsys/topk.py), so memory is
    # O(batch_size * item_block_size) instead of O(batch_size * n_items); None = one dense score matrix.
    item_block_size: int | None = Field(None, ge=1)
    # Where the model scores (the baselines stay on the CPU); recorded in report.json as "device".
    device: Device = "auto"
    # Metrics per segment of users by history length (events before the split's target), e.g. [5, 20]:
    # 1-4, 5-19 and 20+ events; in report.json under "segments". Empty = no segments.
    history_segments: tuple[int, ...] = ()
    # Metrics per segment of users by the event type of the split's target (its first, with several targets):
    # how well views, carts and purchases are predicted; in report.json under "type_segments". Needs features
    # with event types (data.event_type_col).
    type_segments: bool = False
    # Items already in the user's history are dropped from the ranking (the target never is), the standard
    # protocol. False: they compete like any other item, for repeat domains (groceries, music, re-reads)
    # served with candidates.exclude_seen=false. Also governs training's validation metric (early stopping,
    # the best checkpoint) and the re-scored promotion gate, so the model is chosen by what is measured.
    exclude_seen: bool = True

    @field_validator("ks")
    @classmethod
    def _ks(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError("evaluate.ks must list at least one cutoff K, each K >= 1 and none twice "
                             f"(e.g. [10, 20, 50]), got {list(ks)}")
        return ks

    @model_validator(mode="after")
    def _repeat_competes(self) -> EvaluateConfig:
        if "repeat" in self.baselines and self.exclude_seen:
            raise ValueError("evaluate.baselines lists repeat with evaluate.exclude_seen=true: repeat ranks the user's "
                             "own items first, and with seen items excluded only a re-consumed target is left of them, "
                             "so it would come first by construction (a leak, not a baseline); use repeat with "
                             "evaluate.exclude_seen=false, or drop it from evaluate.baselines")
        return self

    @field_validator("history_segments")
    @classmethod
    def _ascending(cls, bounds: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 2 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ValueError("evaluate.history_segments must be strictly ascending bounds of at least 2 "
                             f"(e.g. [5, 20]), got {list(bounds)}")
        return bounds


class CandidatesConfig(_Section):
    """Top-K retrieval with FAISS."""

    k: int = Field(100, ge=1)
    index: str = "Flat"
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)
    # Auto-tune: nprobe (IVF) / efSearch (HNSW) doubled from the smallest until ANN recall@k against exact
    # search on recall_sample users reaches this (recsys/retrieval.tune_index); None = nprobe / ef_search as given.
    target_recall: float | None = Field(None, gt=0.0, le=1.0)
    # Recall gate: a night whose ANN recall@k on the sample is below this is not published (its lists go to
    # candidates/rejected/ as a drift failure does); None = recorded only. Not applied when no sampled user has
    # an unseen item (nothing to recall).
    min_recall: float | None = Field(None, gt=0.0, le=1.0)
    batch_size: int = Field(4096, ge=1)
    recall_sample: int = Field(1000, ge=1)
    exclude_seen: bool = True
    # Which model scores: None = <work_dir>/model, else a local directory or an MLflow URI such as
    # models:/sasrec@champion or models:/sasrec/3 (``recsys candidates --model``).
    model: PathText | None = None
    # The night the candidates are for, the partition date=YYYY-MM-DD; None = today (UTC).
    date: dt.date | None = None

    @field_validator("date", mode="before")
    @classmethod
    def _date_as_text(cls, value: Any) -> Any:
        """A number is no night: pydantic would read 1714521600 as epoch seconds and 20240501 as an error about
        datetimes; the partition names the date as YYYY-MM-DD."""
        if (isinstance(value, int | float) and not isinstance(value, bool)) or (
                isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit()):
            raise ValueError(f"{value!r} is a number; write the night's date as YYYY-MM-DD, e.g. 2024-05-01")
        return value
    # Drift gate against the previous night's partition; None = never fail on it.
    min_overlap: float | None = Field(None, ge=0.0, le=1.0)
    max_new_item_share: float | None = Field(None, ge=0.0, le=1.0)
    # Where the user vectors are computed (FAISS always searches on the CPU); recorded in the manifest.
    device: Device = "auto"
    # Score only the ACTIVE users: those with an event at or after (the newest event timestamp in the
    # features - active_window), in the timestamps' own unit (epoch seconds: 604800 = 7 days). Data time,
    # not the clock, so a backfill sees the same users. None = every user of the features.
    active_window: int | None = Field(None, ge=0)
    # The only items that may be candidates tonight (in stock, licensed, not withdrawn): a CSV (with a header)
    # or Parquet file with an item_id column, read at every run. The popularity fallback obeys it too.
    # None = every item the model knows.
    allowed_items: PathText | None = None
    # Retention: after a night is published, its partitions (published and rejected) dated keep_days days or
    # more before it are deleted (for a shard: that shard's own). 7 = tonight and the 6 nights before. None = keep
    # everything.
    keep_days: int | None = Field(None, ge=1)


class TrackingConfig(_Section):
    """MLflow: ``uri`` None means an embedded SQLite store in the work directory."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "recsys"
    registered_model: str = "sasrec"
    # Promotion gate: a challenger becomes champion if its val NDCG@10 >= champion's - tolerance.
    promotion_tolerance: float = Field(0.0, ge=0.0)
    # What the gate compares: "recorded" = each version's best val NDCG@10 from its own training (on the data
    # it was trained on); "rescored" = the champion and the challenger both scored tonight on the same
    # validation users of the current features (recsys/comparison.py), with the paired difference.
    promotion_basis: Literal["recorded", "rescored"] = "recorded"
    # MLflow HTTP client (a tracking server): per-request timeout, retries and exponential backoff.
    http_timeout_s: int = Field(30, ge=1)
    http_max_retries: int = Field(2, ge=0, le=10)
    http_backoff_factor: int = Field(1, ge=0)
    # Retention of MLflow history (recsys/retention.py), after each successful `recsys run` and by `recsys prune`:
    # versions of registered_model created, and finished runs of experiment ended, keep_days days or more before
    # the run date are deleted (7 = the run date and the 6 days before stay), except versions holding an alias,
    # the latest candidates' versions, the work directory's model and the runs behind every kept version.
    # None = keep everything.
    keep_days: int | None = Field(None, ge=1)

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        """A URI with a scheme MLflow stores by: a typo such as ``http//host:5000`` would otherwise be a local
        directory named ``http`` (every run logged into the job's working directory), ``foo://`` a traceback."""
        if uri is None:
            return None
        if re.match(r"(https?|file|sqlite|postgresql|mysql|mssql|databricks)(\+\w+)?(-uc)?://|file:|databricks(-uc)?$",
                    uri) is None:
            raise ValueError(f"must be a URI MLflow stores by (http(s)://host:port, sqlite:///abs/path.db, "
                             f"postgresql://…, mysql://…, mssql://…, file:dir or databricks), got {uri!r}; "
                             "null keeps an embedded SQLite store in work_dir")
        return uri


class Config(_Section):
    """The whole pipeline's configuration."""

    work_dir: PathText = "work/demo"
    # Log files in <work_dir>/logs last written more than log_keep_days days ago are removed when a job starts
    # (one file per start: a nightly schedule adds several a night). None = keep every log.
    log_keep_days: int | None = Field(None, ge=1)
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    candidates: CandidatesConfig = CandidatesConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _event_types(self) -> Config:
        if self.features.event_types is not None and self.data.event_type_col is None:
            raise ValueError("features.event_types needs data.event_type_col (the column holding the event type)")
        order_only = self.data.format in ("pairs", "sequence_lines") or (
            self.data.format in ("csv", "parquet") and self.data.timestamp_col is None)
        for key in ("max_event_age", "max_history_age"):
            if getattr(self.features, key) is not None and self.data.source == "file" and order_only:
                raise ValueError(
                    f"features.{key} compares events' times with the run date, but data.format="
                    f"{self.data.format!r}" + (" without data.timestamp_col" if self.data.format in ("csv", "parquet")
                                               else "") + " gives line numbers, not times: set data.timestamp_col "
                    f"(csv, parquet) or features.{key}=null")
        stride = self.train.window_stride
        if stride is not None and stride > self.model.max_len:
            raise ValueError(
                f"train.window_stride ({stride}) must be at most model.max_len ({self.model.max_len}), or items "
                "between windows would never be targets; use model.max_len for non-overlapping windows"
            )
        return self

    @model_validator(mode="after")
    def _candidates_index(self) -> Config:
        """candidates.index, nprobe and ef_search as FAISS reads them, for the vectors this model serves
        (model.hidden x model.ensemble wide): a typo fails here (exit 2), not at the end of a night's run."""
        c = self.candidates
        if c.index == "Flat" and c.nprobe is None and c.ef_search is None:
            return self
        try:  # FAISS only where a setting needs it, and only where installed (a training-only GPU image may lack
            # it: the candidates job checks the same when it builds the index)
            from recsys.retrieval import IndexSpecError, empty_index
        except ImportError:
            return self
        dim = self.model.hidden * self.model.ensemble
        try:
            empty_index(c.index, dim, c.nprobe, c.ef_search)
        except IndexSpecError as exc:
            raise ValueError(f"candidates.index / nprobe / ef_search: {exc}; see FAISS's index factory strings "
                             "(e.g. Flat, IVF1024,Flat, HNSW32, IVF4096,PQ16)") from exc
        return self

    @model_validator(mode="after")
    def _training_modes(self) -> Config:
        """Options of the model and training that hold for one attention or loss only; SASRecSystem and SASRec check
        the same at construction, but here they fail before a job reads anything (exit 2)."""
        if self.model.repeat_bias and (self.model.attention != "causal" or self.train.loss != "ce"):
            raise ValueError(f"model.repeat_bias needs model.attention=causal and train.loss=ce (they are "
                             f"{self.model.attention!r} and {self.train.loss!r})")
        if self.model.repeat_bias and self.train.exclude_seen:
            raise ValueError("model.repeat_bias with train.exclude_seen=true: with seen items left out of the softmax "
                             "the bonus could only land on a target that is a repeat (a leak, not a signal); the bias "
                             "is for repeat domains, where train.exclude_seen=false")
        if self.model.repeat_bias and self.evaluate.item_block_size is not None and not self.evaluate.exclude_seen:
            raise ValueError("model.repeat_bias with evaluate.exclude_seen=false is scored densely (the bias of each "
                             "user's own items is not a block of the item table): set evaluate.item_block_size=null")
        if self.train.exclude_seen and not self.evaluate.exclude_seen:
            raise ValueError("train.exclude_seen=true trains as if seen items are never recommended, but "
                             "evaluate.exclude_seen=false ranks them: set train.exclude_seen=false for a repeat domain")
        if self.train.exclude_seen and (self.train.loss != "ce" or self.model.attention != "causal"):
            raise ValueError(f"train.exclude_seen needs train.loss=ce and model.attention=causal (they are "
                             f"{self.train.loss!r} and {self.model.attention!r}); set it to false")
        if self.train.item_drop > 0 and self.model.attention != "causal":
            raise ValueError(f"train.item_drop applies to causal attention only (model.attention is "
                             f"{self.model.attention!r}, whose training already hides items: train.mask_prob); set "
                             "train.item_drop=0 or model.attention=causal")
        return self

    def ignored(self) -> list[str]:
        """The options set away from their defaults that the chosen modes never read, one line each naming the
        key and the mode that leaves it unused (``recsys train`` / ``run`` log them as warnings). They are not
        refused: switching a mode (loss, attention, compile, warm start) would then need several edits."""
        t, default = self.train, TrainConfig()
        unused = {
            "train.mask_prob": (t.mask_prob != default.mask_prob and self.model.attention == "causal",
                                "model.attention=causal (masking is bidirectional training's)"),
            "train.n_negatives": (t.n_negatives != default.n_negatives and t.loss == "ce",
                                  "train.loss=ce (full softmax: every item is a negative)"),
            "train.gbce_t": (t.gbce_t != default.gbce_t and t.loss != "gbce", f"train.loss={t.loss}"),
            "train.compile_mode": (t.compile_mode != default.compile_mode and not t.compile, "train.compile=false"),
            "train.init_shrink": (t.init_shrink != default.init_shrink and t.init_from is None,
                                  "train.init_from=null (no warm start)"),
            "train.init_perturb": (t.init_perturb != default.init_perturb and t.init_from is None,
                                   "train.init_from=null (no warm start)"),
        }
        lines = [f"{key}={getattr(t, key.removeprefix('train.'))!r} has no effect with {why}"
                 for key, (unused_here, why) in unused.items() if unused_here]
        d, data_default = self.data, DataConfig()
        if d.source == "file" and d.format not in ("csv", "parquet"):  # the format names its own fields
            lines += [f"data.{key}={getattr(d, key)!r} has no effect with data.format={d.format} (it names its own "
                      "fields; data.format=csv reads named columns)"
                      for key in ("user_col", "item_col", "timestamp_col", "event_type_col", "weight_col")
                      if getattr(d, key) != getattr(data_default, key)]
        if d.source == "file" and d.format != "csv" and d.columns is not None:
            lines.append(f"data.columns={list(d.columns)!r} has no effect with data.format={d.format} (it names the "
                         "columns of a csv file without a header)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params."""
        return _flatten(self.to_dict())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an optional section set to null (data.item_features)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one silently, so a
    second ``model:`` section would drop the first one's keys)."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one mapping."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        # a merge key (`<<: *defaults`) is no key of its own: construct_mapping merges it, and a key written
        # next to it overrides the merged one, as YAML means
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
        if key in lines:
            raise _DuplicateKeyError(
                None, None, f"key {key!r} appears twice in one mapping (lines {lines[key]} and {line}); keep one",
                key_node.start_mark)
        lines[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _number(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> Any:
    """Numbers as YAML 1.2 reads them, not PyYAML's YAML 1.1: ``010`` is 10 (not octal 8), and ``1:00:00`` or
    ``12:30`` is text (not base-60 3600 / 750), which a number key then refuses, naming it."""
    text = str(loader.construct_scalar(node))
    if ":" in text:
        return text
    digits = text.replace("_", "").lstrip("+-")
    if node.tag == "tag:yaml.org,2002:int" and digits.isdigit():
        return (-1 if text.startswith("-") else 1) * int(digits)
    construct = yaml.SafeLoader.construct_yaml_int if node.tag.endswith(":int") else yaml.SafeLoader.construct_yaml_float
    return construct(loader, node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _number)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _number)


def _parse_value(raw: str) -> Any:
    """An override value parsed as YAML; text that is not valid YAML (``%d/%m/%Y``, ``[x``) stays a string.

    The typed config then rejects a string where another type is needed, naming the key.
    """
    if not raw:
        return None
    if not raw.strip():  # a TAB (data.separator) is text, not YAML's nothing
        return raw
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKeyError:
        raise  # valid YAML, not text: parse_overrides names the override
    except (yaml.YAMLError, ValueError):  # ValueError: a bad explicit tag such as `!!int x`
        return raw
    # YAML syntax that swallows a one-word value: `|` / `>` (block scalars) read as "", `!` (a tag) as null, `-` /
    # `?` as a block list / mapping, and ` #…` as a comment (`tracking.experiment=prod #2` became "prod"): a shell
    # argument means the text itself. Lists and mappings are written in flow style ([a, b], {k: v}).
    text = raw.strip()
    if value is None and text not in _NULLS and not text.startswith("!!null") \
            or value == "" and text not in ('""', "''") \
            or isinstance(value, list | dict) and not text.startswith(("[", "{")):
        return raw
    comment = re.search(r"(?:^|\s)#", raw)
    if comment is not None and _comment_dropped(raw[:comment.start()], value):
        return raw
    return value


def _comment_dropped(before: str, value: Any) -> bool:
    """Whether YAML read ``before`` (the text up to a `` #``) as ``value``: then the rest was taken as a comment
    (not so when the ``#`` is inside quotes: the text before it is then no complete YAML value)."""
    if not before.strip():
        return True
    try:
        return yaml.load(before, Loader=_UniqueKeyLoader) == value  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, ValueError):
        return False


_NULLS = ("~", "null", "Null", "NULL")


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``tree`` (left unchanged) with each dotted ``key=value`` set at its path: siblings stay (so
    ``train.type_weights.buy=3`` keeps the file's other weights), and a mapping value replaces the key's whole
    value (``train.type_weights={}`` clears it)."""
    out = copy.deepcopy(tree)
    for item in overrides:
        key, value = _override(item)
        *parents, leaf = key.split(".")
        model: type[BaseModel] | None = Config
        for part in parents:
            model = _section_of(model, part)
        section, node = _section_of(model, leaf), out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if section is not None and isinstance(value, dict) and isinstance(node, dict) \
                and isinstance(node.get(leaf), dict):  # a whole section: merged into the file's, as extends does
            value = _merge(node[leaf], value, section)
        _set_path(out, key, value)
    return out


def _override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key.path=value")
    try:
        return key.strip(), _parse_value(raw)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"override '{item}': {exc.problem}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=0.01", "model.hidden=32"]`` into a nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        _set_path(tree, *_override(item))
    return tree


def _section_of(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The section class of field ``key`` of ``model`` (an optional section too); None for a value."""
    field = None if model is None else model.model_fields.get(key)
    if field is None:
        return None
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, _Section):
            return candidate
    return None


def _merge(base: dict[str, Any], extra: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """``extra`` over ``base``: sections merge key by key, a value replaces, a mapping-valued key
    (``train.type_weights``) as a whole: a child file's ``type_weights: {}`` clears its parent's weights."""
    model = Config if model is None else model
    out = dict(base)
    for key, value in extra.items():
        section = _section_of(model, key)
        if section is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, section)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; ``extends: other.yaml`` merges another file first.

    Raises ConfigError naming the file if it is missing, not a file, not YAML, not a mapping, or part of an
    ``extends`` cycle.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass --config with a YAML file under conf/")
    if not path.is_file():
        fix = f"fix 'extends' in {_children[-1]}" if _children else "pass --config with a YAML file under conf/"
        raise ConfigError(f"config file {path} does not exist; {fix}")
    if path.resolve() in _children:
        chain = " -> ".join(str(p) for p in (*_children, path.resolve()))
        raise ConfigError(f"config file {path}: 'extends' forms a cycle ({chain}); remove one 'extends'")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:  # ValueError: e.g. `!!int x`
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("extends", None)
    if parent is not None:
        tree = _merge(read_yaml(path.parent / str(parent), (*_children, path.resolve())), tree)
    return tree


def build_config(tree: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict into a :class:`Config`; errors list every bad key path."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {loc}: unknown key (check the spelling against conf/base.yaml)")
            elif err["type"] == "value_error":  # our own cross-key checks: the message names the keys
                lines.append(f"  {loc}: {err.get('ctx', {}).get('error', err['msg'])}")
            else:
                lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid config from {source}:\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (optional) and apply dotted ``key=value`` overrides on top."""
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    keys = [item.partition("=")[0].strip() for item in overrides or []]
    source = " + ".join([*([str(path)] if path else []), *([f"the command-line overrides ({', '.join(keys)})"]
                                                           if keys else [])]) or "defaults"
    return build_config(tree, source=source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the exact values a job ran with)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
