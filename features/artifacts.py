"""Loading the feature job's artifacts back, checked against their contracts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features import schema
from recsys.storage import DamagedFileError, read_json, read_parquet_file


@dataclass(frozen=True)
class FeatureSet:
    """The feature job's output: sequences, id maps and the manifest, with the item attribute tables
    (schema.ITEM_FEATURES, schema.ITEM_FEATURE_VALUES) where ``data.item_features`` was set, and the event
    types (schema.EVENT_TYPE_MAP; the sequences then hold schema.SEQUENCE_TYPES) where the events have them,
    else None."""

    sequences: pl.DataFrame
    user_map: pl.DataFrame
    item_map: pl.DataFrame
    manifest: dict[str, Any]
    item_features: pl.DataFrame | None = None
    item_feature_values: pl.DataFrame | None = None
    event_types: pl.DataFrame | None = None

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def n_users(self) -> int:
        return int(self.manifest["n_users"])


def load_features(directory: str | Path) -> FeatureSet:
    """Read ``sequences``, ``user_map``, ``item_map`` and ``manifest.json`` from ``directory``.

    Raises FileNotFoundError (naming the file and the job to run) or ValueError on a contract mismatch.
    """
    directory = Path(directory)
    tables = {}
    for name, contract in (
        ("sequences", schema.SEQUENCES),
        ("user_map", schema.USER_MAP),
        ("item_map", schema.ITEM_MAP),
    ):
        tables[name] = _read_table(directory / schema.FEATURE_FILES[name], contract)
    manifest = read_json(directory / schema.FEATURE_FILES["manifest"], "rebuild the features with `recsys features`")
    _check_one_build(directory, tables, manifest)
    if manifest.get("item_features"):
        for name, contract in (("item_features", schema.ITEM_FEATURES),
                               ("item_feature_values", schema.ITEM_FEATURE_VALUES)):
            tables[name] = _read_table(directory / schema.ITEM_FEATURE_FILES[name], contract)
    if manifest.get("event_types"):
        tables["event_types"] = _read_table(directory / schema.EVENT_TYPE_FILES["event_types"],
                                            schema.EVENT_TYPE_MAP)
        path = directory / schema.FEATURE_FILES["sequences"]
        schema.check_schema(tables["sequences"], schema.SEQUENCE_TYPES, str(path))
    return FeatureSet(tables["sequences"], tables["user_map"], tables["item_map"], manifest,
                      tables.get("item_features"), tables.get("item_feature_values"), tables.get("event_types"))


def _check_one_build(directory: Path, tables: dict[str, pl.DataFrame], manifest: dict[str, Any]) -> None:
    """The tables and the manifest of ``directory`` describe one build (a table copied in from another work
    directory, or restored from another day's backup, paired each user's history with another's id)."""
    users = {"sequences.parquet": tables["sequences"].height, "user_map.parquet": tables["user_map"].height,
             "manifest.json n_users": manifest.get("n_users")}
    items = {"item_map.parquet": tables["item_map"].height, "manifest.json n_items": manifest.get("n_items")}
    for what, counts in (("users", users), ("items", items)):
        if len({n for n in counts.values() if n is not None}) > 1:
            listed = ", ".join(f"{name} {n}" for name, n in counts.items())
            raise DamagedFileError(f"{directory}: its files are not of one build ({what}: {listed}); rebuild the "
                                   "features with `recsys features`")


def _read_table(path: Path, contract: dict[str, Any]) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `recsys features` first")
    table = read_parquet_file(path, "rebuild the features with `recsys features`")
    try:
        schema.check_schema(table, contract, str(path))
    except ValueError as exc:  # a readable Parquet file, but not this table: another file copied over it
        raise DamagedFileError(f"{exc}: not the table the features job writes; rebuild the features with "
                               "`recsys features`") from None
    return table


def last_event_times(directory: str | Path) -> pl.DataFrame:
    """(``user_idx`` Int32, ``last_timestamp`` Int64): each user's newest event in ``directory``'s
    ``events.parquet`` (every kept event, all splits), read by a streaming scan.

    Raises FileNotFoundError naming the file, ValueError naming a missing column.
    """
    path = Path(directory) / schema.FEATURE_FILES["events"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `recsys features` first")
    columns = pl.read_parquet_schema(path)
    for col in (schema.USER_IDX, schema.TIMESTAMP):
        if col not in columns:
            raise ValueError(f"{path}: missing column '{col}'; rebuild the features with `recsys features`")
    return (pl.scan_parquet(path, glob=False)
            .group_by(schema.USER_IDX)
            .agg(pl.col(schema.TIMESTAMP).max().alias("last_timestamp"))
            .collect(engine="streaming"))
