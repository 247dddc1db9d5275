"""The feature job: read -> validate -> row policies -> k-core -> encode ids -> split -> write atomically.

Writes ``<work_dir>/features/``: the files of schema.FEATURE_FILES plus ``config.yaml``. The reading and
event-type filter form one lazy plan collected once (after one aggregate validation pass over the input);
sorting by user and time, de-duplication, the k-core, encoding and the split then work in memory.

With ``features.partitions`` = P > 1 the job runs out of core, for inputs larger than memory: one streaming
pass writes the events as P ranges of user_id with about equal row counts; the row policies run on one range
at a time (every policy but the item k-core only looks at one user's rows; the item k-core then runs in rounds
over all ranges, with item counts from a streaming pass), the id maps come from the kept rows of all ranges, then each range is encoded and split on its own, and streaming passes join the parts
into the same files as P = 1 writes. Peak memory follows the largest range, not the input.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from features.encode import add_train_count, build_item_index, build_user_map, encode_events
from features.item_features import build_item_features, cold_item_ids, read_item_rows
from features.policies import DROP_REASONS, Accounting, select_rows
from features.readers import InputDataError, check_unchanged, file_stamps, input_files, read_events
from features.schema import (
    ENCODED_EVENTS,
    EVENT_TYPE,
    EVENT_TYPE_FILES,
    EVENT_TYPE_MAP,
    FEATURE_FILES,
    ITEM_FEATURE_FILES,
    ITEM_ID,
    ITEM_MAP,
    MAX_EVENT_TYPES,
    SEQUENCE_TYPES,
    SEQUENCES,
    SPLIT,
    TIMESTAMP,
    TYPE_IDX,
    USER_ID,
    USER_MAP,
    check_schema,
)
from features.sequences import SPLIT_LISTS, add_split, build_sequences
from features.synthetic import generate_events
from features.validation import timestamp_unit
from recsys.config import Config, ConfigError, DataConfig, FeaturesConfig, SyntheticConfig, save_config
from recsys.storage import atomic_dir, fingerprint, remove_stale_temps, shown, temp_sibling, write_json

logger = logging.getLogger(__name__)

_RANGE = "_range"  # the user range of a row, out of core

_CONTRACTS: dict[str, dict[str, Any]] = {
    "events": ENCODED_EVENTS,
    "sequences": SEQUENCES,
    "user_map": USER_MAP,
    "item_map": ITEM_MAP,
}
# written only when the events have types: the type table, and the sequences' type lists
_TYPED_CONTRACTS: dict[str, dict[str, Any]] = {"event_types": EVENT_TYPE_MAP, "sequences": SEQUENCE_TYPES}
_FILES = FEATURE_FILES | ITEM_FEATURE_FILES | EVENT_TYPE_FILES


def build_features(cfg: Config, run_date: dt.date | None = None) -> dict[str, Any]:
    """Run the whole feature job for ``cfg`` and return the manifest it wrote; ``run_date`` (default today,
    UTC) is the reference of ``features.max_event_age``.

    Raises InputDataError for unusable input (including no rows left after the policies, and a failed input
    gate: the previous features are kept then) and ConfigError for settings that do not fit the data
    (``data.path`` not a file, features.event_types without an event_type column).
    """
    data, path = resolve_input(cfg)
    files = input_files(data, path)  # listed once: these files are validated, read and fingerprinted
    stamps = file_stamps(files)  # before validation: a file changed after it is caught by the fingerprint
    events, target = read_events(data, path, files), Path(cfg.work_dir) / "features"
    # a build killed between atomic_dir's two renames left the previous features as .features.old-*: put them
    # back before the gate reads the previous manifest (of any host when the job holds the work directory lock
    # alone, as `recsys features` and `recsys run` do: see recsys.storage.exclusive_writer)
    remove_stale_temps(target.parent)
    gate = InputGate.of(cfg.features, target, run_date or datetime.now(UTC).date())
    rows = attribute_rows(cfg)  # first: a bad attribute file fails before the events are processed
    try:
        if cfg.features.partitions > 1:
            manifest = build_out_of_core(cfg, events, path, stamps, target, gate, rows)
        else:
            kept, accounting = select_rows(events, cfg.features, gate.history_since)
            _check_kept(accounting, path, cfg.features)
            cold, named = cold_items(cfg, rows, events, gate.history_since)
            item_index, event_items = catalogue(kept, cold)
            tables = encode_and_split(kept, cfg.features, item_index, event_type_index(kept, path))
            manifest = gate.check(build_manifest(cfg, path, stamps, accounting, tables), path)
            attributes, manifest["item_features"] = item_attributes(cfg, rows, tables["item_map"], event_items,
                                                                    named)
            write_features(target, tables | attributes, manifest, cfg)
    except (pl.exceptions.PolarsError, OSError):
        # the files are read again after validation: an exporter still appending (a line that no longer
        # parses) or a file removed meanwhile fails that read; the cause to report is the change (exit 3)
        check_unchanged(stamps)
        raise
    logger.info(
        "features: %d users, %d items, %d events kept",
        manifest["n_users"],
        manifest["n_items"],
        manifest["rows_kept"],
    )
    return manifest


@dataclass(frozen=True)
class InputGate:
    """``features.min_rows_ratio`` / ``max_event_age``: this build against the previous build of the same
    work directory and the run date, checked before anything is written."""

    min_rows_ratio: float | None
    max_event_age: int | None
    previous_rows_in: int | None  # None: no previous build (or one without a manifest)
    reference: int  # end of the run date, epoch seconds (UTC)
    max_history_age: int | None = None  # features.max_history_age: the window of history kept

    @property
    def history_since(self) -> int | None:
        """The oldest timestamp the features keep (end of the run date - features.max_history_age), None = all."""
        return None if self.max_history_age is None else self.reference - self.max_history_age

    @classmethod
    def of(cls, features: FeaturesConfig, target: Path, run_date: dt.date) -> InputGate:
        previous = target / FEATURE_FILES["manifest"]
        rows = None
        if previous.is_file():
            try:
                rows = json.loads(previous.read_text()).get("rows_in")
                if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 0):
                    raise ValueError(f"its rows_in is {rows!r}, not a row count")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as exc:
                rows = None
                if isinstance(exc, AttributeError):  # valid JSON, but no object (e.g. [])
                    exc = ValueError("not a JSON object")
                if features.min_rows_ratio is not None:  # the ratio needs it
                    raise ConfigError(f"{previous} (the previous build, which features.min_rows_ratio compares "
                                      f"with) is not a features manifest ({exc}); restore it, remove {target} to "
                                      "start afresh, or unset features.min_rows_ratio") from None
                logger.warning("%s is not a features manifest (%s): no previous row count recorded", previous, exc)
        end = datetime.combine(run_date + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
        gate = cls(features.min_rows_ratio, features.max_event_age, rows, int(end.timestamp()),
                   features.max_history_age)
        since = gate.history_since
        if since is not None and features.split == "time" and features.val_cutoff is not None \
                and since >= features.val_cutoff:
            raise ConfigError(f"features.max_history_age {features.max_history_age} keeps events from {since} (end of "
                              f"the run date {run_date} minus it) on, but features.val_cutoff is {features.val_cutoff}: "
                              "training (the events before val_cutoff) would get none; move the cutoffs forward or "
                              "raise features.max_history_age")
        return gate

    def check(self, manifest: dict[str, Any], path: Path) -> dict[str, Any]:
        """``manifest`` with ``input_gate`` added; raises InputDataError naming the file, the key and the
        numbers if the input is shorter than the ratio allows or its newest event is too old."""
        rows, newest = manifest["rows_in"], manifest["newest_timestamp"]
        kept = "the previous features are kept"
        ages = [f"features.{key}" for key in ("max_event_age", "max_history_age") if getattr(self, key) is not None]
        if ages and newest is not None and timestamp_unit(newest) != "seconds":  # as features.readers judges
            raise InputDataError(
                f"{path}: the newest timestamp is {newest}, past the year 5000 as epoch seconds: milliseconds (or "
                f"finer)? {' and '.join(ages)} compare timestamps with the run date in epoch seconds, so they would "
                f"check nothing; {kept}; export epoch seconds (or ISO-8601 text), or unset {' and '.join(ages)}")
        if (self.min_rows_ratio is not None and self.previous_rows_in is not None
                and rows < self.min_rows_ratio * self.previous_rows_in):
            raise InputDataError(
                f"{path}: {rows} rows, {rows / self.previous_rows_in:.1%} of the previous build's "
                f"{self.previous_rows_in} (features.min_rows_ratio {self.min_rows_ratio}): a truncated or "
                f"partial export? {kept}; rerun once the input is complete, or lower features.min_rows_ratio")
        since = None if self.max_event_age is None else self.reference - self.max_event_age
        if since is not None and newest < since:
            raise InputDataError(
                f"{path}: the newest event (timestamp {newest}) is older than {since} = end of the run date "
                f"({self.reference}) - features.max_event_age {self.max_event_age}: a stale export? {kept}; "
                "rerun once new events arrived, or raise features.max_event_age")
        return {**manifest, "input_gate": {"min_rows_ratio": self.min_rows_ratio,
                                           "previous_rows_in": self.previous_rows_in,
                                           "max_event_age": self.max_event_age, "newest_since": since,
                                           "max_history_age": self.max_history_age,
                                           "history_since": self.history_since}}


def _check_kept(accounting: Accounting, path: Path, features: FeaturesConfig) -> None:
    """Raise InputDataError naming the settings to relax if the row policies left no events; warn about a type of
    ``features.event_types`` that no event has (a typo filters every event of the type meant; a quiet night
    may just lack a rare type, so it does not fail the job; the manifest lists them as ``event_types_unmatched``)."""
    unmatched = accounting.unmatched_types(features)
    if unmatched:
        seen = sorted(accounting.types_in)
        logger.warning("features.event_types lists %s, which no event of %s has (its event types: %s%s): a typo "
                       "filters every event of the type meant; correct the spelling, or remove them from the list",
                       unmatched, path, seen[:20], " …" if len(seen) > 20 else "")
    if not accounting.rows_kept:
        raise InputDataError(
            f"{path}: no events left after the row policies ({accounting.rows_in} rows in, dropped "
            f"{accounting.dropped}); relax {_settings_that_dropped(accounting, features)}"
        )


def _settings_that_dropped(accounting: Accounting, features: FeaturesConfig) -> str:
    """The settings (with their values) behind the drop reasons that removed rows, for an error message."""
    settings = {
        "event_type_filtered": f"features.event_types (now {list(features.event_types or [])})",
        "user_kcore": f"features.min_user_events (now {features.min_user_events})",
        "item_kcore": f"features.min_item_events (now {features.min_item_events})",
        "user_too_active": f"features.max_user_events (now {features.max_user_events})",
        "older_than_history": f"features.max_history_age (now {features.max_history_age})",
    }
    named = [text for reason, text in settings.items() if accounting.dropped.get(reason)]
    return " or ".join(named) or "the row policies under features"


def attribute_rows(cfg: Config) -> pl.DataFrame | None:
    """The rows of the ``data.item_features`` file (features.item_features.read_item_rows), None without it."""
    if cfg.data.item_features is None:
        return None
    return read_item_rows(cfg.data.item_features, cfg.data.item_id_type)


def cold_items(cfg: Config, rows: pl.DataFrame | None, events: pl.LazyFrame | None, since: int | None = None
               ) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """With ``data.item_features.cold_items``, the file's items (with a value) to add to the catalogue: those no
    input event names (``events``, before the row policies) at or after ``since`` (``features.max_history_age``:
    an item whose events all predate the history window is as new to the model as one never bought). An item
    whose events in the window the policies removed (a k-core, ``features.event_types``) stays out, as it would
    without attributes. Returns them and the other listed items (``item_id``: those events name)."""
    if rows is None or cfg.data.item_features is None or not cfg.data.item_features.cold_items:
        return None, None
    listed = cold_item_ids(rows)
    if events is None:  # no input event at all
        return listed, listed.clear()
    if since is not None:
        events = events.filter(pl.col(TIMESTAMP) >= since)  # the complement of policies.mark_history
    in_events = events.select(pl.col(ITEM_ID).cast(listed.schema[ITEM_ID])).unique().collect(engine="streaming")
    return (listed.join(in_events, on=ITEM_ID, how="anti"),
            listed.join(in_events, on=ITEM_ID, how="semi"))


def item_attributes(
    cfg: Config, rows: pl.DataFrame | None, item_map: pl.DataFrame, event_items: int,
    named: pl.DataFrame | None = None,
) -> tuple[dict[str, pl.DataFrame], dict[str, Any] | None]:
    """The item attribute tables (schema.ITEM_FEATURE_FILES) and the manifest's ``item_features`` section for
    the catalogue of ``item_map``, of which ``event_items`` have a kept event; none (``{}``, None) without
    ``data.item_features``. ``named`` (with ``cold_items``, :func:`cold_items`): listed items with a value that
    input events name, so no cold items; those not in the catalogue (the row policies removed all their events)
    are counted as ``not_cold_events_removed``."""
    if rows is None or cfg.data.item_features is None:
        return {}, None
    tables, section = build_item_features(cfg.data.item_features, rows, item_map, event_items)
    if named is not None:
        known = item_map.select(pl.col(ITEM_ID).cast(named.schema[ITEM_ID]))
        section["not_cold_events_removed"] = named.join(known, on=ITEM_ID, how="anti").height
    return tables, section


def resolve_input(cfg: Config) -> tuple[DataConfig, Path]:
    """The reader settings and file: ``data.path`` as configured, or freshly generated synthetic events.

    Raises ConfigError if ``data.path`` matches no file (a setting to fix, not bad data).
    """
    if cfg.data.source == "file":
        path = Path(cfg.data.path)
        files = input_files(cfg.data, path)  # a directory or glob of csv / parquet files: checked there
        if len(files) == 1 and not files[0].is_file():
            raise ConfigError(
                f"data.path: {shown(path)} does not exist; set data.path to the events file, a directory of csv / "
                "parquet files or a glob (e.g. `recsys features data.path=events.csv`) or set "
                "data.source=synthetic"
            )
        return cfg.data, path
    path = Path(cfg.work_dir) / "input" / "events.csv"
    write_synthetic(cfg.data.synthetic, path)
    return DataConfig(source="synthetic", path=str(path), format="csv", event_type_col=EVENT_TYPE,
                      user_id_type=cfg.data.user_id_type, item_id_type=cfg.data.item_id_type), path


def write_synthetic(cfg: SyntheticConfig, path: Path) -> None:
    """Generate synthetic events and write them as csv to ``path`` (replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)  # of a process killed while writing
    partial = temp_sibling(path)
    try:
        generate_events(cfg).write_csv(partial)
        os.replace(partial, path)
    except BaseException:  # a full disk, a stop: no partial file left beside the input
        partial.unlink(missing_ok=True)
        raise


def encode_and_split(
    kept: pl.DataFrame, features: FeaturesConfig, item_index: pl.DataFrame | None = None,
    types: pl.DataFrame | None = None,
) -> dict[str, pl.DataFrame]:
    """The four tables of the feature set (keys of ``_CONTRACTS``) from the kept rows of ``select_rows``, over
    the catalogue ``item_index`` (:func:`catalogue`; None: the kept events' items), and with ``types``
    (:func:`event_type_index`) the ``event_types`` table and the events' type lists in the sequences."""
    user_map = build_user_map(kept)
    item_index = build_item_index(kept) if item_index is None else item_index
    events = split_events(kept, user_map, item_index, features, types)
    tables = {
        "events": events,
        "sequences": build_sequences(events),
        "user_map": user_map,
        "item_map": add_train_count(item_index, events),
    }
    return tables if types is None else tables | {"event_types": types}


def event_type_index(kept: pl.DataFrame | pl.LazyFrame, path: Path) -> pl.DataFrame | None:
    """schema.EVENT_TYPE_MAP of the kept events' types (``type_idx`` 1..n by name, ``n_events`` kept events of
    each), None if the events have no ``event_type`` column. Raises InputDataError naming the file if there are
    more types than schema.MAX_EVENT_TYPES (the column holds something else than a handful of event kinds)."""
    if EVENT_TYPE not in kept.collect_schema().names():
        return None
    counts = (kept.lazy().filter(pl.col(EVENT_TYPE).is_not_null()).group_by(EVENT_TYPE)
              .agg(pl.len().cast(pl.Int64).alias("n_events")).sort(EVENT_TYPE).collect())
    if counts.height > MAX_EVENT_TYPES:
        raise InputDataError(
            f"{path}: the event type column holds {counts.height} distinct values, more than {MAX_EVENT_TYPES}; "
            "it should name a handful of event kinds (view, cart, purchase): check data.event_type_col")
    index = pl.int_range(1, pl.len() + 1, dtype=pl.Int16).alias(TYPE_IDX)
    return counts.select(EVENT_TYPE, index, "n_events")


def catalogue(kept: pl.DataFrame | pl.LazyFrame, extra_items: pl.DataFrame | None) -> tuple[pl.DataFrame, int]:
    """The item index (features.encode.build_item_index) of the kept events' items and ``extra_items`` (an
    ``item_id`` column: cold items with no event), and how many of its items have a kept event."""
    events = build_item_index(kept)
    if extra_items is None:
        return events, events.height
    extra = extra_items.select(pl.col(ITEM_ID).cast(events.schema[ITEM_ID]))
    return build_item_index(pl.concat([events.select(ITEM_ID), extra])), events.height


def split_events(
    kept: pl.DataFrame | pl.LazyFrame,
    user_map: pl.DataFrame,
    item_index: pl.DataFrame,
    features: FeaturesConfig,
    types: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """``ENCODED_EVENTS`` of kept rows in ``select_rows`` order (so by user_idx, then time: no sort needed),
    with ``types`` (:func:`event_type_index`) also each event's ``type_idx`` (0 for a null type)."""
    encoded = kept.lazy().pipe(encode_events, user_map, item_index)
    columns = [pl.col(name) for name in ENCODED_EVENTS]
    if types is not None:
        type_idx = pl.col(EVENT_TYPE).replace_strict(types[EVENT_TYPE], types[TYPE_IDX], default=0,
                                                     return_dtype=pl.Int16)  # a null type too: 0
        columns.append(type_idx.alias(TYPE_IDX))
    return encoded.pipe(add_split, features).select(columns).collect()


def build_out_of_core(
    cfg: Config, events: pl.LazyFrame, path: Path, stamps: dict[Path, tuple[int, int]], target: Path,
    gate: InputGate, rows: pl.DataFrame | None = None,
) -> dict[str, Any]:
    """The feature job over ``features.partitions`` user ranges (module docstring); returns the manifest.
    ``stamps``: the input files as :func:`build_manifest` takes them; ``rows``: the item attribute file's rows
    (:func:`attribute_rows`), if any.

    Writes the same files as :func:`write_features`, atomically. Raises InputDataError if the row policies
    leave no events or the input gate fails (nothing is published then).
    """
    features = cfg.features
    with atomic_dir(target) as out:
        scratch = out / "partitions"
        ranges = partition_by_user(events, features.partitions, scratch / "input")
        inputs = [file for files in ranges for file in files]  # read before _select_ranges removes them
        cold, named = cold_items(cfg, rows, pl.scan_parquet(inputs, glob=False) if inputs else None,
                                 gate.history_since)
        kept_files, accounting = _select_ranges(ranges, features, scratch / "kept", gate.history_since)
        _check_kept(accounting, path, features)
        kept = pl.scan_parquet(kept_files, glob=False)
        user_map, (item_index, event_items) = build_user_map(kept), catalogue(kept, cold)
        types = event_type_index(kept, path)
        parts: dict[str, list[Path]] = {"events": [], "sequences": []}
        for file in kept_files:
            encoded = split_events(pl.scan_parquet(file, glob=False), user_map, item_index, features, types)
            file.unlink()
            for name, table in (("events", encoded), ("sequences", build_sequences(encoded))):
                _check(name, table, typed=types is not None)
                parts[name].append(scratch / f"{name}-{len(parts[name]):05d}.parquet")
                table.write_parquet(parts[name][-1])
        for name, files in parts.items():
            pl.scan_parquet(files, glob=False).sink_parquet(out / FEATURE_FILES[name])
        shutil.rmtree(scratch)
        written = {name: pl.scan_parquet(out / FEATURE_FILES[name], glob=False) for name in parts}
        maps = {"user_map": user_map, "item_map": add_train_count(item_index, written["events"])}
        maps |= {} if types is None else {"event_types": types}
        manifest = gate.check(build_manifest(cfg, path, stamps, accounting, written | maps), path)
        for name, table in maps.items():
            _check(name, table, typed=types is not None)
        attributes, manifest["item_features"] = item_attributes(cfg, rows, maps["item_map"], event_items, named)
        write_tables(out, maps | attributes, manifest, cfg)
    return manifest


def partition_by_user(events: pl.LazyFrame, partitions: int, directory: Path) -> list[list[Path]]:
    """Write ``events`` into ``directory`` as up to ``partitions`` user_id ranges of about equal row counts.

    Two streaming passes: rows per user, then the split. Returns each range's files, ranges in user_id order;
    a range keeps the input order of its rows, and a user's rows are never split over two ranges.
    """
    per_user = events.group_by(USER_ID).len().sort(USER_ID).collect(engine="streaming")
    rows = per_user["len"].cast(pl.Int64)
    first_range = (rows.cum_sum() - rows) * partitions // rows.sum()  # range of each user by rows before it
    bounds = per_user.filter(first_range != first_range.shift(1, fill_value=0))[USER_ID].to_list()
    # range = number of bounds <= user_id; an elementwise sum streams, while search_sorted (not elementwise)
    # made polars 2.1 hold the whole input in memory (5.9 GB of 200M rows)
    above = [(pl.col(USER_ID) >= bound).cast(pl.UInt32) for bound in bounds]
    key = pl.sum_horizontal(pl.lit(0, pl.UInt32), *above).alias(_RANGE)

    def name(args: pl.io.partition.FileProviderArgs) -> str:
        return f"{args.partition_keys[_RANGE][0]:05d}-{args.index_in_partition:05d}.parquet"

    target = pl.PartitionBy(directory, key=_RANGE, include_key=False, file_path_provider=name)
    events.with_columns(key).sink_parquet(target, mkdir=True)
    return [sorted(directory.glob(f"{index:05d}-*.parquet")) for index in range(len(bounds) + 1)]


def _select_ranges(
    ranges: list[list[Path]], features: FeaturesConfig, directory: Path, since: int | None = None
) -> tuple[list[Path], Accounting]:
    """Row policies on each user range; writes each range's kept rows (``select_rows`` order) into ``directory``.

    Returns the written files in user order (empty ranges write none) and the accounting over all ranges.
    """
    directory.mkdir(parents=True)
    files: list[Path] = []
    total = Accounting(0, 0, dict.fromkeys(DROP_REASONS, 0))
    local = features.model_copy(update={"min_item_events": 1})  # the item k-core counts every range: below
    for index, range_files in enumerate(ranges):
        if not range_files:
            continue
        kept, accounting = select_rows(pl.scan_parquet(range_files, glob=False), local, since)
        total += accounting
        for file in range_files:
            file.unlink()
        if kept.height:
            files.append(directory / f"{index:05d}.parquet")
            kept.write_parquet(files[-1])
    if features.min_item_events > 1:
        files, dropped = _item_kcore(files, features.min_user_events, features.min_item_events)
        total = replace(total, rows_kept=total.rows_kept - sum(dropped.values()),
                        dropped={reason: rows + dropped.get(reason, 0) for reason, rows in total.dropped.items()})
    return files, total


def _item_kcore(files: list[Path], min_user: int, min_item: int) -> tuple[list[Path], dict[str, int]]:
    """policies.filter_kcore over the user ranges ``files``, each already through its user k-core: item counts
    over every range (a streaming group-by), then each range's rows of rare items and users left below
    ``min_user`` dropped, range by range, repeated until stable; the same passes in the same order as in memory,
    so the same rows and counts per reason. Returns the ranges still holding rows and the rows dropped."""
    dropped, rounds = {"user_kcore": 0, "item_kcore": 0}, 0
    while files:
        counts = pl.scan_parquet(files, glob=False).group_by(ITEM_ID).len().collect(engine="streaming")
        rare = counts.filter(pl.col("len") < min_item)[ITEM_ID]
        if rare.is_empty():
            break
        rounds += 1
        left = []
        for file in files:
            rows = pl.read_parquet(file)
            kept = rows.filter(~pl.col(ITEM_ID).is_in(rare.implode()))
            dropped["item_kcore"] += rows.height - kept.height
            users = kept.filter(pl.len().over(USER_ID) >= min_user)
            dropped["user_kcore"] += kept.height - users.height
            if users.height < rows.height:
                file.unlink()
                if users.height:
                    users.write_parquet(file)
            if users.height:
                left.append(file)
        files = left
    logger.info("item k-core over %d user ranges: %d round(s), dropped %s", len(files), rounds, dropped)
    return files, dropped


def build_manifest(
    cfg: Config, path: Path, stamps: dict[Path, tuple[int, int]], accounting: Accounting,
    tables: dict[str, pl.DataFrame | pl.LazyFrame],
) -> dict[str, Any]:
    """Counts, accounting, resolved config and input fingerprint describing one feature build; ``stamps``
    (readers.file_stamps) are the input files read, as they were before validation. Raises InputDataError
    naming the file if one changed since (features.readers.check_unchanged)."""
    per_split = dict(tables["events"].lazy().group_by(SPLIT).len().collect().iter_rows())
    newest = tables["events"].lazy().select(pl.col(TIMESTAMP).max()).collect().item()
    with_items = [(pl.col(SPLIT_LISTS[split]).list.len() > 0).sum().alias(split) for split in ("val", "test")]
    n_with = tables["sequences"].lazy().select(with_items).collect().row(0, named=True)
    return {
        "rows_in": accounting.rows_in,
        "rows_kept": accounting.rows_kept,
        "dropped": accounting.dropped,
        "event_types_unmatched": accounting.unmatched_types(cfg.features),  # listed, but no event has them
        "n_users": tables["user_map"].height,
        "n_items": tables["item_map"].height,
        "n_users_with_val": int(n_with["val"]),
        "n_users_with_test": int(n_with["test"]),
        "n_events_per_split": {split: per_split.get(split, 0) for split in SPLIT_LISTS},
        "newest_timestamp": newest,  # of the kept events
        "event_types": _event_type_section(tables.get("event_types"), accounting.rows_kept),
        "split": cfg.features.split,
        "config": cfg.to_dict(),
        "inputs": {"events": _fingerprint(path, stamps)},
        "polars_version": pl.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _event_type_section(types: pl.DataFrame | None, rows_kept: int) -> dict[str, Any] | None:
    """The manifest's ``event_types``: kept events per type and with a null type (type_idx 0: the kept events
    the type table does not count); None without types."""
    if types is None:
        return None
    counts = dict(types.select(EVENT_TYPE, "n_events").iter_rows())
    return {"n_types": len(counts), "n_events": counts, "null_types": rows_kept - sum(counts.values())}


def _fingerprint(path: Path, stamps: dict[Path, tuple[int, int]]) -> dict[str, Any]:
    """The fingerprint of the files of ``stamps``: of the file, or ``{"path", "files": [fingerprint per
    file]}`` for several; checked unchanged after hashing, so each hash is of the file that was validated."""
    prints = [fingerprint(file) for file in stamps]
    check_unchanged(stamps)
    return prints[0] if len(prints) == 1 else {"path": str(path), "files": prints}


def write_features(
    target: Path, tables: dict[str, pl.DataFrame], manifest: dict[str, Any], cfg: Config
) -> None:
    """Check every table against its contract, then write all files into ``target`` atomically."""
    typed = "event_types" in tables
    for name in _CONTRACTS | (_TYPED_CONTRACTS if typed else {}):
        _check(name, tables[name], typed)
    with atomic_dir(target) as tmp:
        write_tables(tmp, tables, manifest, cfg)


def _check(name: str, table: pl.DataFrame, typed: bool) -> None:
    """Check the table ``name`` against its contract and, when the events have types, its typed one."""
    for contracts in (_CONTRACTS, _TYPED_CONTRACTS if typed else {}):
        if name in contracts:
            check_schema(table, contracts[name], _FILES[name])


def write_tables(
    directory: Path, tables: dict[str, pl.DataFrame], manifest: dict[str, Any], cfg: Config
) -> None:
    """Write ``tables`` (keys of schema.FEATURE_FILES, ITEM_FEATURE_FILES and EVENT_TYPE_FILES), the manifest
    and ``config.yaml`` into ``directory``."""
    for name, table in tables.items():
        table.write_parquet(directory / _FILES[name])
    write_json(directory / FEATURE_FILES["manifest"], manifest)
    save_config(cfg, directory / "config.yaml")
