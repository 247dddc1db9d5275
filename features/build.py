"""The feature job: read -> validate -> row policies -> k-core -> encode ids -> split -> write atomically.

Writes ``<work_dir>/features/``: the files of schema.FEATURE_FILES plus ``config.yaml``. The reading and
row policies form one lazy plan collected once (after one aggregate validation pass over the input); the
k-core, encoding and split then work on the kept rows in memory.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from features.encode import add_train_count, build_item_index, build_user_map, encode_events
from features.policies import Accounting, apply_policies
from features.readers import InputDataError, read_events
from features.schema import (
    EVENT_TYPE,
    FEATURE_FILES,
    ITEM_IDX,
    ITEM_MAP,
    SEQUENCES,
    TIMESTAMP,
    USER_IDX,
    USER_MAP,
    check_schema,
)
from features.sequences import SPLIT, SPLIT_LISTS, assign_split, build_sequences
from features.synthetic import generate_events
from recsys.config import Config, ConfigError, DataConfig, FeaturesConfig, SyntheticConfig, save_config
from recsys.storage import atomic_dir, fingerprint, write_json

logger = logging.getLogger(__name__)

# Contract of events.parquet (kept events, encoded, with their split); belongs in features/schema.py.
ENCODED_EVENTS: dict[str, pl.DataType] = {
    USER_IDX: pl.Int32(),
    ITEM_IDX: pl.Int32(),
    TIMESTAMP: pl.Int64(),
    SPLIT: pl.String(),
}
_CONTRACTS: dict[str, dict[str, Any]] = {
    "events": ENCODED_EVENTS,
    "sequences": SEQUENCES,
    "user_map": USER_MAP,
    "item_map": ITEM_MAP,
}


def build_features(cfg: Config) -> dict[str, Any]:
    """Run the whole feature job for ``cfg`` and return the manifest it wrote.

    Raises InputDataError for unusable input (including no rows left after the policies) and ConfigError
    for settings that do not fit the data (``data.path`` not a file, features.event_types without an
    event_type column).
    """
    data, path = resolve_input(cfg)
    kept, accounting = apply_policies(read_events(data, path), cfg.features)
    if kept.is_empty():
        raise InputDataError(
            f"{path}: no events left after the row policies ({accounting.rows_in} rows in, dropped "
            f"{accounting.dropped}); relax {_settings_that_dropped(accounting, cfg.features)}"
        )
    tables = encode_and_split(kept, cfg.features)
    manifest = build_manifest(cfg, path, accounting, tables)
    write_features(Path(cfg.work_dir) / "features", tables, manifest, cfg)
    logger.info(
        "features: %d users, %d items, %d events kept",
        manifest["n_users"],
        manifest["n_items"],
        accounting.rows_kept,
    )
    return manifest


def _settings_that_dropped(accounting: Accounting, features: FeaturesConfig) -> str:
    """The settings (with their values) behind the drop reasons that removed rows, for an error message."""
    settings = {
        "event_type_filtered": f"features.event_types (now {list(features.event_types or [])})",
        "user_kcore": f"features.min_user_events (now {features.min_user_events})",
        "item_kcore": f"features.min_item_events (now {features.min_item_events})",
    }
    named = [text for reason, text in settings.items() if accounting.dropped.get(reason)]
    return " or ".join(named) or "the row policies under features"


def resolve_input(cfg: Config) -> tuple[DataConfig, Path]:
    """The reader settings and file: ``data.path`` as configured, or freshly generated synthetic events.

    Raises ConfigError if ``data.path`` is missing or not a file (a setting to fix, not bad data).
    """
    if cfg.data.source == "file":
        path = Path(cfg.data.path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(
                f"data.path: {path} {what}; set data.path to the events file "
                "(e.g. `recsys features data.path=events.csv`) or set data.source=synthetic"
            )
        return cfg.data, path
    path = Path(cfg.work_dir) / "input" / "events.csv"
    write_synthetic(cfg.data.synthetic, path)
    return DataConfig(source="synthetic", path=str(path), format="csv", event_type_col=EVENT_TYPE), path


def write_synthetic(cfg: SyntheticConfig, path: Path) -> None:
    """Generate synthetic events and write them as csv to ``path`` (replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    generate_events(cfg).write_csv(partial)
    os.replace(partial, path)


def encode_and_split(kept: pl.DataFrame, features: FeaturesConfig) -> dict[str, pl.DataFrame]:
    """The four tables of the feature set (keys of ``_CONTRACTS``) from the kept canonical events."""
    user_map = build_user_map(kept)
    item_index = build_item_index(kept)
    events = (
        kept.lazy()
        .pipe(encode_events, user_map, item_index)
        .pipe(assign_split, features)
        .select(list(ENCODED_EVENTS))
        .collect()
    )
    return {
        "events": events,
        "sequences": build_sequences(events),
        "user_map": user_map,
        "item_map": add_train_count(item_index, events),
    }


def build_manifest(
    cfg: Config, path: Path, accounting: Accounting, tables: dict[str, pl.DataFrame]
) -> dict[str, Any]:
    """Counts, accounting, resolved config and input fingerprint describing one feature build."""
    sequences = tables["sequences"]
    per_split = dict(tables["events"].group_by(SPLIT).len().iter_rows())
    return {
        "rows_in": accounting.rows_in,
        "rows_kept": accounting.rows_kept,
        "dropped": accounting.dropped,
        "n_users": tables["user_map"].height,
        "n_items": tables["item_map"].height,
        "n_users_with_val": int((sequences[SPLIT_LISTS["val"]].list.len() > 0).sum()),
        "n_users_with_test": int((sequences[SPLIT_LISTS["test"]].list.len() > 0).sum()),
        "n_events_per_split": {split: per_split.get(split, 0) for split in SPLIT_LISTS},
        "split": cfg.features.split,
        "config": cfg.to_dict(),
        "inputs": {"events": fingerprint(path)},
        "polars_version": pl.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_features(
    target: Path, tables: dict[str, pl.DataFrame], manifest: dict[str, Any], cfg: Config
) -> None:
    """Check every table against its contract, then write all files into ``target`` atomically."""
    for name, contract in _CONTRACTS.items():
        check_schema(tables[name], contract, FEATURE_FILES[name])
    with atomic_dir(target) as tmp:
        for name in _CONTRACTS:
            tables[name].write_parquet(tmp / FEATURE_FILES[name])
        write_json(tmp / FEATURE_FILES["manifest"], manifest)
        save_config(cfg, tmp / "config.yaml")
