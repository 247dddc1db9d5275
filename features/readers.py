"""Read an event file in any supported ``data.format`` into the canonical event columns.

:func:`read_events` returns a LazyFrame with ``user_id`` and ``item_id`` (Int64, or String where
``data.user_id_type`` / ``data.item_id_type`` is ``string``), ``timestamp`` Int64
(epoch seconds, or an order number for formats without time), plus ``event_type`` String / ``weight``
Float64 when the format or the config provides them. Tables (csv, parquet, MovieLens) are scanned lazily;
the line formats (``pairs``, ``sequence_lines``) are read eagerly, then made lazy. Every problem with the
input raises :class:`InputDataError`, never a raw polars error.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl

from features.schema import EVENT_TYPE, ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from features.validation import (
    NO_ROWS,
    POS,
    SHORT,
    find_problems,
    how_to_fix,
    id_expr,
    mixed_units,
    typed_exprs,
)
from recsys.config import ConfigError, DataConfig
from recsys.storage import shown

logger = logging.getLogger(__name__)

_TOKENS = "_tokens"

# Headerless MovieLens layouts: (separator, field names); "sep*" fields are the empty halves of "::".
_MOVIELENS_FIELDS = {
    "movielens_dat": (":", ["user", "sep1", "item", "sep2", "rating", "sep3", "timestamp"]),
    "movielens_udata": ("\t", ["user", "item", "rating", "timestamp"]),
}
_LAYOUTS = {
    "movielens_dat": "'user::item::rating::timestamp' lines",
    "movielens_udata": "'user<TAB>item<TAB>rating<TAB>timestamp' lines",
    "movielens_csv": "a 'userId,movieId,rating,timestamp' header and rows",
}
_MOVIELENS_CSV = {USER_ID: "userId", ITEM_ID: "movieId", WEIGHT: "rating", TIMESTAMP: "timestamp"}


class InputDataError(ValueError):
    """The input cannot be used; the message names the file, the column or line, and what to do."""


@dataclass(frozen=True)
class _Raw:
    """Canonical column names with the file's dtypes, plus ``_pos`` (1-based row or line number)."""

    frame: pl.LazyFrame
    labels: dict[str, str]  # canonical column -> how the user knows it, e.g. "'uid' (data.user_col)"
    unit: str  # "data row" (1-based, header not counted) or "line"


_MANY = ("csv", "parquet")  # formats that read a directory or a glob of files
_GLOB = set("*?[")


def input_files(data: DataConfig, path: str | Path) -> list[Path]:
    """The files behind ``data.path``: the file itself; for ``csv`` / ``parquet``, also every ``*.csv`` (or
    ``*.csv.gz``) / ``*.parquet`` file under a directory (recursively, e.g. ``date=…/part-0.parquet`` partitions) or matching a
    glob (``events/2024-*.parquet``), sorted by path.

    Raises ConfigError (a setting to fix) naming ``data.path`` when nothing matches, or when a directory or
    glob is given for a format that reads one file.
    """
    path = Path(path)
    pattern = not path.exists() and bool(_GLOB & set(str(path)))  # 'export [v2].csv' that exists: a name
    if path.is_file() or not (path.is_dir() or pattern):
        return [path]
    if data.format not in _MANY:
        raise ConfigError(f"data.path: {path} is a {'glob' if pattern else 'directory'}; data.format="
                          f"{data.format!r} reads one file: set data.path to that file")
    suffix = f".{data.format}"
    if pattern:
        found = [Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file()]
        root = Path(*[part for part in itertools.takewhile(lambda p: not _GLOB & set(p), path.parts)])
    else:  # csv also gzip-compressed (part-0.csv.gz), read as its text
        suffixes = (suffix, ".csv.gz") if data.format == "csv" else (suffix,)
        every = [f for f in sorted(path.rglob("*")) if f.is_file()]
        found, root = [f for f in every if f.name.lower().endswith(suffixes)], path  # B.CSV too (Windows exports)
        chosen = set(found)
        others = [f for f in every if f not in chosen and not any(p[0] in "_." for p in f.relative_to(root).parts)]
        if others:
            logger.info("data.path %s: %d file(s) not named *%s skipped, e.g. %s", path, len(others),
                           " / *".join(suffixes), others[0])
    # Spark / Hadoop conventions: names starting with "_" or "." (the _temporary/ of an unfinished write,
    # .part-0.parquet.crc, _SUCCESS) are not data, in the directory itself or any folder under it.
    files = [f for f in found if not any(part[0] in "_." for part in f.relative_to(root).parts)]
    if len(files) < len(found):
        logger.info("data.path %s: %d file(s) under names starting with '_' or '.' skipped (not data), e.g. %s",
                    path, len(found) - len(files), sorted(set(found) - set(files))[0])
    if not files:
        where = "matches no file" if pattern else f"is a directory with no *{suffix} file under it"
        raise ConfigError(f"data.path: {path} {where} (data.format={data.format}); set data.path to the events "
                          "file, a directory of them or a glob such as events/*.parquet")
    return sorted(files)


def file_stamps(files: list[Path]) -> dict[Path, tuple[int, int]]:
    """``{file: (size in bytes, mtime in ns)}`` of each of ``files`` that exists, in their order: taken before
    the files are validated, for :func:`check_unchanged` once they are read."""
    stats = {file: file.stat() for file in files if file.is_file()}
    return {file: (stat.st_size, stat.st_mtime_ns) for file, stat in stats.items()}


def check_unchanged(stamps: dict[Path, tuple[int, int]]) -> None:
    """Raise InputDataError naming the first file of ``stamps`` (:func:`file_stamps`) whose size or mtime
    changed, or that is gone: what was read is not what was validated (or fingerprinted)."""
    for file, (size, mtime_ns) in stamps.items():
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise InputDataError(f"{file} was removed while the features were built from it; rerun once the "
                                 "input is complete (write new files elsewhere and move them in)") from None
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            raise InputDataError(
                f"{file} changed while the features were built from it ({size} -> {stat.st_size} bytes, mtime "
                f"{mtime_ns / 1e9:.3f} -> {stat.st_mtime_ns / 1e9:.3f}): the rows read are not the rows "
                "validated; rerun once the input is complete (write new files elsewhere and move them in)")


def id_types(data: DataConfig) -> dict[str, str]:
    """``{"user_id": data.user_id_type, "item_id": data.item_id_type}`` (``int`` or ``string``)."""
    return {USER_ID: data.user_id_type, ITEM_ID: data.item_id_type}


def read_events(data: DataConfig, path: str | Path, files: list[Path] | None = None) -> pl.LazyFrame:
    """Lazy canonical events of ``path`` read as ``data.format``, validated by one aggregate pass.

    ``path`` may also be a directory or a glob of ``csv`` / ``parquet`` files (:func:`input_files`): each file
    is read and validated on its own (an error names the file and its row), then they are concatenated in path
    order; several files need ``data.timestamp_col`` (their row order is no time order). ``files``: the
    files of ``path`` as listed earlier by :func:`input_files` (so the caller fingerprints the files read),
    None to list them here.

    A file with no rows is an error alone, and skipped (logged) among several, e.g. a quiet day's partition.

    Raises InputDataError if the file is missing, empty, unreadable (not UTF-8, corrupt parquet, ragged
    lines), lacks a configured column, or holds a null / non-integer id or an unparsable timestamp.
    """
    files = input_files(data, path) if files is None else files
    if len(files) > 1:
        if data.timestamp_col is None:
            raise ConfigError(f"data.path: {path} holds {len(files)} files; reading several files needs "
                              "data.timestamp_col (their row order is not a time order)")
        logger.info("reading %d files of %s as %s (%s … %s)", len(files), path, data.format,
                    shown(files[0]), shown(files[-1]))
        spans: dict[str, tuple[int, int]] = {}
        frames = {file: _read_file(data, file, many=True, spans=spans) for file in files}
        empty = [file for file, frame in frames.items() if frame is None]
        if len(empty) == len(files):
            raise InputDataError(f"{path}: every one of its {len(files)} files has no rows; point data.path at "
                                 "files with events")
        if mixed := mixed_units(spans):
            raise InputDataError(f"{path}: {mixed}")
        if empty:  # a quiet day's partition: nothing to read, nothing dropped
            logger.info("data.path %s: %d of %d files have no rows, e.g. %s", path, len(empty), len(files), empty[0])
        return pl.concat([frame for frame in frames.values() if frame is not None], how="vertical")
    frame = _read_file(data, files[0], many=False)
    assert frame is not None  # an empty single file is an error
    return frame


def _read_file(data: DataConfig, path: Path, many: bool, spans: dict[str, tuple[int, int]] | None = None
               ) -> pl.LazyFrame | None:
    """One file's canonical events; None when it has no rows and is one of ``many`` files. ``spans``: see
    :func:`features.validation.find_problems`."""
    if not path.is_file():
        raise InputDataError(
            f"input file {shown(path)} does not exist or is not a file; fix data.path "
            f"(currently {data.path!r}) or set data.source: synthetic. If the file was there when the job started "
            "(it was listed), it was removed or renamed while the job read: rerun once the export is complete"
        )
    if many and path.stat().st_size == 0:  # a quiet day's partition written as a 0-byte file: no rows
        return None
    if data.format != "parquet" and _utf16(path):  # read as UTF-8, its header is garbage: name the encoding
        raise InputDataError(f"{path} is UTF-16 text (as Excel's 'Unicode text' and Windows PowerShell's `>` "
                             "write it), not UTF-8: re-encode it, e.g. `iconv -f utf-16 -t utf-8`, or export it "
                             "as UTF-8")
    try:
        with _polars_errors(path, data):
            raw = _SCANNERS[data.format](data, path)
            typed = typed_exprs(raw.frame, data.timestamp_format, id_types(data))
            problems = find_problems(raw.frame, typed, raw.labels, raw.unit, source=str(path),
                                     id_types=id_types(data), short_line=lambda: _first_short_line(path, data),
                                     spans=spans)
    except EmptyFileError:  # no header either: a lone newline (pandas' empty csv), an empty .gz
        if many:
            return None
        raise
    except InputDataError:  # a day with no rows is none whatever its columns: pandas writes an empty frame's
        if many and data.format == "parquet" and _parquet_rows(path) == 0:  # parquet with no column at all
            return None
        raise
    if problems == [NO_ROWS] and many:
        return None
    if problems:
        raise InputDataError(f"{path} (data.format={data.format!r}):\n  - " + "\n  - ".join(problems))
    if not many:  # one line per file of a partitioned input would grow every night's log by a line a partition
        logger.info("reading %s as %s", path, data.format)
    frame = raw.frame.select(list(typed.values()))
    if data.format == "sequence_lines":  # positions per user as parsed: lines of '07' and '7' are one user's
        frame = frame.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over(USER_ID).alias(TIMESTAMP))
    return frame


def _select(
    lf: pl.LazyFrame,
    path: Path,
    columns: dict[str, tuple[str, str]],
    unit: str = "data row",
    text: bool = True,
) -> _Raw:
    """Rename ``{canonical: (file column, how to configure it)}`` after checking every column exists.

    In ``text`` files a row with no value in any column (a blank line) holds no event and is skipped, as
    the line formats skip blank lines; ``_pos`` still counts it, so positions match the file. Text files also
    get the validation.SHORT column, for find_problems to catch lines with too few fields.
    """
    names = lf.collect_schema().names()
    for source, key in columns.values():
        if source not in names:
            hint = " (only one column: is data.separator right?)" if len(names) == 1 else ""
            fix = f"Set {key} to one of them or fix the file"
            if text and _looks_like_data(names):
                fix = ("That first line looks like an event, not a header: for a file without a header line set "
                       "data.columns to the names of its columns in order (e.g. data.columns=[user_id,item_id,"
                       f"timestamp]), then {key} to one of those")
            if text and _is_parquet(path):
                raise InputDataError(f"{path} is a Parquet file, read as text (data.format is not 'parquet'); set "
                                     "data.format=parquet")
            raise InputDataError(
                f"{path}: column '{source}' ({key}) not found; the file has columns {names}{hint}. {fix}"
            )
        if f"{source}_duplicated_0" in names:  # how polars renames a repeated header name
            raise InputDataError(
                f"{path}: column '{source}' ({key}) appears more than once in the header; "
                "rename or remove the extra column so the file says which one holds the data"
            )
    lf = lf.with_row_index(POS, offset=1)
    extra = []
    if text:
        lf = lf.filter(~pl.all_horizontal(pl.exclude(POS).is_null()))
        extra = [pl.col(names[-1]).is_null().alias(SHORT)]  # a line cut short lacks the last field
    frame = lf.select(pl.col(POS), *[pl.col(source).alias(name) for name, (source, _) in columns.items()], *extra)
    return _Raw(frame, {name: f"'{source}' ({key})" for name, (source, key) in columns.items()}, unit)


def _looks_like_data(names: list[str]) -> bool:
    """Whether a header holds mostly numbers (two or more columns, at least half of them numbers): an event
    read as the header of a file without one."""
    numbers = sum(pl.Series(names).str.strip_chars().cast(pl.Float64, strict=False).is_not_null())
    return len(names) > 1 and numbers * 2 >= len(names)


def _is_parquet(path: Path) -> bool:
    """Whether ``path`` starts with Parquet's magic bytes."""
    with path.open("rb") as fh:
        return fh.read(4) == b"PAR1"


def _scan_table(data: DataConfig, path: Path) -> _Raw:
    """csv / parquet with column names from the config; no timestamp column means timestamp = row order."""
    if data.format == "parquet":
        lf = pl.scan_parquet(path, glob=False)  # a concrete file: '[' in its name is no pattern
    else:
        if len(data.separator) != 1:
            raise ConfigError(f"data.separator must be one character, got {data.separator!r}")
        header = {} if data.columns is None else {"has_header": False, "new_columns": list(data.columns)}
        if data.columns is not None and [f.lower() for f in _first_fields(path, data.separator, data.quote_char)] \
                == [c.lower() for c in data.columns]:
            raise InputDataError(f"{path}: its first line names the columns {list(data.columns)}: a header, which "
                                 "data.columns (for a file without one) would read as an event; remove data.columns")
        lf = pl.scan_csv(path, separator=data.separator, quote_char=data.quote_char, infer_schema=False, glob=False,
                         **header)
    optional = {TIMESTAMP: "timestamp_col", EVENT_TYPE: "event_type_col", WEIGHT: "weight_col"}
    columns = {USER_ID: (data.user_col, "data.user_col"), ITEM_ID: (data.item_col, "data.item_col")}
    columns |= {
        name: (getattr(data, key), f"data.{key}") for name, key in optional.items() if getattr(data, key)
    }
    raw = _select(lf, path, columns, text=data.format != "parquet")
    if data.timestamp_col is not None:
        return raw
    order = (pl.col(POS).cast(pl.Int64) - 1).alias(TIMESTAMP)
    return _Raw(raw.frame.with_columns(order), raw.labels | {TIMESTAMP: "row order"}, raw.unit)


def _scan_movielens(data: DataConfig, path: Path) -> _Raw:
    """ratings.dat (``u::i::r::t``), u.data (tab-separated) or ratings.csv (header); rating -> weight."""
    if data.format == "movielens_csv":
        lf = pl.scan_csv(path, infer_schema=False, glob=False)
        key = "MovieLens ratings.csv header"
        return _select(lf, path, {name: (col, key) for name, col in _MOVIELENS_CSV.items()})
    separator, fields = _MOVIELENS_FIELDS[data.format]
    lf = pl.scan_csv(
        path, has_header=False, separator=separator, new_columns=fields, infer_schema=False, quote_char=None,
        glob=False,
    )
    canonical = {USER_ID: "user", ITEM_ID: "item", WEIGHT: "rating", TIMESTAMP: "timestamp"}
    columns = {
        name: (field, f"field {fields.index(field) + 1} of data.format={data.format}")
        for name, field in canonical.items()
    }
    return _select(lf, path, columns, unit="line")


def _open_bytes(path: Path) -> BinaryIO:
    """``path`` opened for reading bytes, gzip-compressed files decompressed (as the CSV reader does): the line
    formats and the error diagnostics read the text the reader saw, not the compressed bytes."""
    return gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")  # type: ignore[return-value]


def _read_lines(path: Path, data: DataConfig) -> pl.DataFrame:
    """Non-blank lines of a text file: ``_pos`` (1-based line number) and ``_tokens`` (whitespace-split)."""
    with _open_bytes(path) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first id
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, data) from exc
    lines = pl.DataFrame({"line": text.split("\n")}).with_row_index(POS, offset=1)
    tokens = pl.col("line").str.extract_all(r"\S+").alias(_TOKENS)
    return lines.select(POS, tokens).filter(pl.col(_TOKENS).list.len() > 0)


def _read_pairs(data: DataConfig, path: Path) -> _Raw:
    """``user item`` per line, already in time order per user: timestamp = line number."""
    lines = _read_lines(path, data)
    bad = lines.filter(pl.col(_TOKENS).list.len() != 2)
    if bad.height:
        pos, tokens = bad.row(0)
        raise InputDataError(
            f"{path}: line {pos} has {len(tokens)} field(s) {tokens} ({bad.height} such line(s)); "
            "data.format 'pairs' expects exactly 'user item' per line (use csv for other layouts)"
        )
    frame = lines.select(
        POS,
        pl.col(_TOKENS).list.get(0).alias(USER_ID),
        pl.col(_TOKENS).list.get(1).alias(ITEM_ID),
        pl.col(POS).cast(pl.Int64).alias(TIMESTAMP),
    )
    labels = {USER_ID: "'user' (field 1)", ITEM_ID: "'item' (field 2)", TIMESTAMP: "line number"}
    return _Raw(frame.lazy(), labels, "line")


def _read_sequence_lines(data: DataConfig, path: Path) -> _Raw:
    """``user item item ...`` per line: timestamp = position in the user's items (in file order)."""
    lines = _read_lines(path, data)
    has_items = pl.col(_TOKENS).list.len() > 1
    if n_empty := lines.filter(~has_items).height:
        logger.warning("%s: %d line(s) hold a user but no items; they add no events", path, n_empty)
    frame = (
        lines.filter(has_items)
        .select(
            POS,
            pl.col(_TOKENS).list.first().alias(USER_ID),
            pl.col(_TOKENS).list.slice(1).alias(ITEM_ID),
        )
        .explode(ITEM_ID)
        # per user as written; _read_file renumbers per parsed id, so '07' and '7' do not interleave
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over(USER_ID).alias(TIMESTAMP))
    )
    labels = {USER_ID: "'user' (field 1)", ITEM_ID: "'item' (fields 2..)", TIMESTAMP: "position in line"}
    return _Raw(frame.lazy(), labels, "line")


_SCANNERS: dict[str, Callable[[DataConfig, Path], _Raw]] = {
    "csv": _scan_table,
    "parquet": _scan_table,
    "movielens_dat": _scan_movielens,
    "movielens_udata": _scan_movielens,
    "movielens_csv": _scan_movielens,
    "pairs": _read_pairs,
    "sequence_lines": _read_sequence_lines,
}


def read_item_ids(path: str | Path, key: str, kind: str = "int") -> pl.Series:
    """The distinct ``item_id`` values (sorted; Int64, or String for ``kind`` ``string`` as
    data.item_id_type says) of a CSV (with a header) or Parquet file that lists items, e.g.
    ``candidates.allowed_items``; ``key`` names the config key in messages.

    Raises FileNotFoundError (a config problem) if there is no such file, InputDataError naming the file and
    column if it cannot be read, lacks an ``item_id`` column, holds a value that is not an item id of that
    type (with its data row), or lists no item.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{shown(path)} does not exist or is not a file; fix {key} (a CSV or Parquet file "
                                f"with an {ITEM_ID} column) or set it to null")
    frame, data_rows = read_table(path, key, f"write one {ITEM_ID} per row under an '{ITEM_ID}' header")
    if ITEM_ID not in frame.columns:
        raise InputDataError(f"{path} ({key}) has no column '{ITEM_ID}' (it has {frame.columns}); name the "
                             f"column of item ids '{ITEM_ID}'")
    raw = frame[ITEM_ID]
    ids = frame.select(id_expr(raw.dtype, ITEM_ID, kind))[ITEM_ID]
    if ids.null_count():
        row = int(ids.is_null().arg_true()[0])
        raise InputDataError(f"{path} ({key}), column '{ITEM_ID}', data row {data_rows[row]}: {raw[row]!r} is not an "
                             f"item id; {how_to_fix(ITEM_ID, {ITEM_ID: kind})}, as in the events")
    if ids.len() == 0:
        raise InputDataError(f"{path} ({key}) lists no items, which would leave no candidate for anyone; list "
                             f"the items to allow, or set {key}=null to allow every item")
    return ids.unique().sort()


def read_table(path: Path, key: str, fix: str, separator: str = ",") -> tuple[pl.DataFrame, pl.Series]:
    """A small side table that ``key`` names: Parquet by its ``.parquet`` suffix, else CSV with a header (every
    column as text), and each of its rows' data row number in the file (1-based, blank lines counted, as the
    events' messages count them). Raises InputDataError naming the file, the key and ``fix`` if it cannot be
    read."""
    parquet = path.suffix == ".parquet"
    try:
        frame = (pl.read_parquet(path, glob=False) if parquet
                 else pl.read_csv(path, separator=separator, infer_schema=False, glob=False))
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        kind = "Parquet" if parquet else f"CSV with a header (separator {separator!r})"
        raise InputDataError(f"{path} ({key}) cannot be read as {kind}: {first}; {fix}") from exc
    rows = pl.int_range(1, frame.height + 1, dtype=pl.Int64, eager=True).alias(POS)
    if parquet:
        return frame, rows
    # As the events: a header naming a column twice is refused (polars renames the second copy), a blank line
    # holds no row, and a line cut short is an error rather than empty cells (only checked when a last cell is
    # empty: the csv module's pass over the file is slower than polars').
    if repeated := [c.removesuffix("_duplicated_0") for c in frame.columns if c.endswith("_duplicated_0")]:
        raise InputDataError(f"{path} ({key}): column '{repeated[0]}' appears more than once in the header; rename "
                             f"or remove the extra column; {fix}")
    if frame.width:
        blank = frame.select(pl.all_horizontal(pl.all().is_null()))[:, 0]
        frame, rows = frame.filter(~blank), rows.filter(~blank)
    if frame.width and frame[frame.columns[-1]].null_count():
        short = _first_short_line(path, DataConfig(format="csv", separator=separator))
        if short is not None:
            raise InputDataError(f"{path} ({key}): {short}")
    return frame, rows


def _parquet_rows(path: Path) -> int | None:
    """The row count a parquet file's footer gives, None when it cannot be read."""
    try:
        return pl.scan_parquet(path, glob=False).select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError):
        return None


class EmptyFileError(InputDataError):
    """A text file with no header and no rows: an error alone, a quiet day's partition among several."""


@contextmanager
def _polars_errors(path: Path, data: DataConfig) -> Iterator[None]:
    """Turn polars / OS errors raised while reading ``path`` into InputDataError naming the file."""
    try:
        yield
    except pl.exceptions.NoDataError as exc:
        raise EmptyFileError(
            f"{path} is empty (no header, no rows); point data.path at a file with events"
        ) from exc
    except pl.exceptions.PolarsError as exc:
        raise _explain(exc, path, data) from exc
    except (OSError, EOFError) as exc:  # EOFError: a gzip cut short, read by the line formats
        if getattr(exc, "errno", None) is None and _is_gzip(path):  # the file opened: its bytes are the problem
            raise InputDataError(f"{path} is gzip-compressed but cannot be decompressed ({exc}): it is truncated "
                                 "or corrupt (a copy or export cut short?); copy or export it again") from exc
        raise InputDataError(f"{path} cannot be read ({exc}); check the path and its permissions") from exc


def _is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with gzip's magic bytes (False if it cannot be opened: its reader says why)."""
    try:
        with path.open("rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _utf16(path: Path) -> bool:
    """Whether ``path`` (decompressed) looks like UTF-16 text: a UTF-16 byte-order mark (Excel's "Unicode text",
    PowerShell's `>`), or a NUL byte in every other place of its start."""
    try:
        with _open_bytes(path) as fh:
            start = fh.read(64)
    except (OSError, EOFError):  # unreadable: the reader's own error says why
        return False
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    return len(start) >= 8 and (set(start[1::2]) == {0} or set(start[0::2]) == {0})


def _explain(exc: Exception, path: Path, data: DataConfig) -> InputDataError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "utf-8" in text.lower() or "utf8" in text.lower():
        return _utf8_error(path, data)
    if data.format == "parquet":
        return InputDataError(
            f"{path} is not a readable parquet file (truncated or corrupt?): {first}. "
            "Re-export the file, or set data.format to match it"
        )
    layout = _LAYOUTS.get(data.format, f"fields separated by {data.separator!r} (data.separator)")
    separator, quote = _dialect(data)
    headed = data.format in ("csv", "movielens_csv")
    if headed and quote and any(word in text.lower() for word in ("malformed", "could not parse", "quote")):
        found = _first_quote_problem(path, separator, quote)
        if found is not None:
            line, field, problem = found
            name = _header_name(path, separator, field, data.columns)
            return InputDataError(
                f"{path}: line {line}, field {field}{'' if name is None else f' ({name!r})'}: {problem}. A field "
                f"that holds {quote} must be quoted as a whole, with each {quote} inside it doubled "
                f"({quote}55{quote}{quote} TV{quote}); fix the export, or set data.quote_char: null if the file "
                "never quotes its fields"
            )
    if "new_columns" in first:  # polars' advice (`missing_columns=...`) is not something a user can set
        first = "the first line has a different number of fields"
        if data.format == "csv" and data.columns is not None:
            width = len(_first_fields(path, separator, quote))
            return InputDataError(
                f"{path}: data.columns names {len(data.columns)} columns {list(data.columns)}, but the file's first "
                f"line has {width} fields: name every column of the file, in order")
    where = _first_long_line(path, data) if "more fields" in first else ""
    return InputDataError(
        f"{path} cannot be parsed as data.format={data.format!r}, expected {layout}: {first}{where}. "
        "Check that data.format matches the file and every line has the same number of fields"
    )


def _first_long_line(path: Path, data: DataConfig) -> str:
    """ " (line N has K fields, the first line M)" for the first line with more fields than the first."""
    found = _first_ragged_line(path, data, short=False)
    return "" if found is None else f" (line {found[0]} has {found[1]} fields, the first line {found[2]})"


def _first_short_line(path: Path, data: DataConfig) -> str | None:
    """The problem of the first line with fewer fields than the first (the header), None if there is none."""
    found = _first_ragged_line(path, data, short=True)
    if found is None:
        return None
    line, fields, width = found
    return (f"line {line} has {fields} field(s), fewer than the {width} of the first line: a line cut short "
            "(an unfinished export?), whose missing fields would be read as empty/null; complete or remove "
            "the line, so that every line has the same number of fields")


def _dialect(data: DataConfig) -> tuple[str, str | None]:
    """(field separator, quote character or None) of ``data.format``'s text layout."""
    return {
        "movielens_dat": (":", None),
        "movielens_udata": ("\t", None),
        "movielens_csv": (",", '"'),
    }.get(data.format, (data.separator, data.quote_char))


def _first_ragged_line(path: Path, data: DataConfig, short: bool) -> tuple[int, int, int] | None:
    """(line number, fields, fields of the first line) of the first line with more fields than the first
    line, or fewer if ``short``; read with the csv module, so quoted separators and line breaks count right.
    A blank line has no fields and is no short line."""
    separator, quote = _dialect(data)
    quoting = csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8", errors="replace", newline="") as fh:
        rows = csv.reader(fh, delimiter=separator, quotechar=quote, quoting=quoting)
        width = len(next(rows, []))
        for row in rows:
            if (0 < len(row) < width) if short else len(row) > width:
                return rows.line_num, len(row), width
    return None


def _utf8_error(path: Path, data: DataConfig) -> InputDataError:
    """Error naming the line (and, for csv with a header, the column) of the first invalid UTF-8 byte. The
    file is read in 1 MiB pieces (a 30 GB export with one bad byte near its end must not be held in memory)."""
    where = ""
    found = _first_invalid_utf8(path)
    if found is not None:
        line, byte, before = found
        where = f" (byte 0x{byte:02x} at line {line}"
        if data.format in ("csv", "movielens_csv"):
            separator = _dialect(data)[0]
            name = _header_name(path, separator, before.count(separator.encode()) + 1,
                                data.columns if data.format == "csv" else None)
            where += "" if name is None else f", column {name!r}"
        where += ")"
    return InputDataError(
        f"{path} is not valid UTF-8 text{where}. Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
    )


def _first_invalid_utf8(path: Path, piece: int = 1 << 20) -> tuple[int, int, bytes] | None:
    """(line number, the byte, the bytes of its line before it) of the first byte of ``path`` that is not
    UTF-8, None if there is none."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, current = 1, b""  # current: the bytes of the line being read, up to the last piece
    with _open_bytes(path) as fh:
        while True:
            chunk = fh.read(piece)
            try:
                decoder.decode(chunk, final=not chunk)
                bad = None
            except UnicodeDecodeError as exc:
                pending = len(exc.object) - len(chunk)  # bytes of an unfinished character carried over
                bad = exc.start - pending  # its offset in chunk (< 0: it began in the previous piece)
                first = exc.object[exc.start]
            end = len(chunk) if bad is None else max(bad, 0)
            text = current + chunk[:end]
            cut = text.rfind(b"\n")
            line += text.count(b"\n", len(current))
            if bad is not None:
                return line, first, text[cut + 1 :] if bad >= 0 else current[: len(current) + bad]
            if not chunk:
                return None
            current = text[cut + 1 :]


def _first_quote_problem(path: Path, separator: str, quote: str) -> tuple[int, int, str] | None:
    """(line, 1-based field, what is wrong) of the first misplaced ``quote`` of a csv file: one inside a field
    that does not start with it, text right after a closing one, or a quoted field never closed. Lines
    without a quote (outside a quoted field) are skipped whole; a line with quotes is walked character by
    character (~20 MB/s of such lines on this project's 2-core CPU): run only on a parse error, to name it."""
    opened: tuple[int, int] | None = None  # (line, field) of the quoted field still open at a line's end
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8", errors="replace", newline="") as fh:
        for number, text in enumerate(fh, start=1):
            if opened is None and quote not in text:
                continue
            line = text.rstrip("\r\n")
            field, at, start = (1 if opened is None else opened[1]), 0, opened is None  # start: a field's 1st char
            inside = opened is not None
            while at < len(line):
                char = line[at]
                if inside:
                    if char == quote:
                        if line[at + 1 : at + 2] == quote:  # a doubled quote inside a quoted field
                            at += 1
                        else:
                            inside, opened = False, None
                            after = line[at + 1 : at + 2]
                            if after not in ("", separator):
                                return number, field, (f"text ({after!r}) right after the closing {quote} of a "
                                                       "quoted field")
                elif char == separator:
                    field, start = field + 1, True
                    at += 1
                    continue
                elif char == quote:
                    if not start:
                        return number, field, f"a {quote} inside a field that is not quoted"
                    inside = True
                start = False
                at += 1
            if inside:
                opened = opened or (number, field)
    if opened is not None:
        return opened[0], opened[1], f"a field opened with {quote} is never closed"
    return None


def _first_fields(path: Path, separator: str, quote: str | None = '"') -> list[str]:
    """The stripped fields of ``path``'s first line (csv rules, ``quote`` None: no quoting), [] for an empty or
    unreadable file."""
    dialect: dict[str, Any] = {"quotechar": quote} if quote else {"quoting": csv.QUOTE_NONE}
    try:
        with io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", errors="replace", newline="") as fh:
            return [field.strip() for field in next(csv.reader(fh, delimiter=separator, **dialect), [])]
    except (OSError, EOFError):  # the reader's own error says why
        return []


def _header_name(path: Path, separator: str, field: int, columns: tuple[str, ...] | None = None) -> str | None:
    """The header's name of the 1-based ``field`` of a csv file (its first line; ``columns``, data.columns, for
    a file without a header), None if it has none."""
    if columns is not None:
        return columns[field - 1] if 0 < field <= len(columns) else None
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8", errors="replace", newline="") as fh:
        names = next(csv.reader(fh, delimiter=separator), [])
    return names[field - 1] if 0 < field <= len(names) else None
