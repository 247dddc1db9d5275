"""Coerce raw event columns to the canonical dtypes and find every value that does not convert.

The input is a "raw" frame whose columns already carry the canonical names (``user_id``, ``item_id``,
``timestamp`` and optionally ``event_type``, ``weight``) but still hold the file's dtypes (often String),
plus ``_pos``: the 1-based data row or line number, used only to point at a bad value. Nothing here raises:
:func:`find_problems` returns sentences that the reader turns into one ``InputDataError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import polars as pl

from features.schema import EVENT_TYPE, ITEM_ID, TIMESTAMP, USER_ID, WEIGHT

logger = logging.getLogger(__name__)

POS = "__recsys_pos"  # not "_pos": a file may have a column of that name
# In text tables: True where the row's last field (of the first line's columns) is null: an empty last field,
# or a line cut short, which the CSV reader fills with nulls; find_problems asks the reader which it is.
SHORT = "_short"
_SECONDS_PER_YEAR = 31_556_952

# Tried in order on string timestamps when data.timestamp_format is not set; `%#z` accepts Z, +02:00, +0200.
ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)

_INT_IDS = (f"ids must be whole numbers that fit in Int64 (at most {2**63 - 1}); for text ids (SKUs, UUIDs) set "
            "data.{key}: string")
# what SQL and pandas exports write for a missing value: as a text id it would be one item (or user) shared by
# every row that lacks one
MISSING_TEXT = ("\\N", "NULL", "null", "None", "NONE", "none", "NaN", "nan", "<NA>", "N/A", "n/a", "#N/A")
_TEXT_IDS = (f"ids must not be blank nor a missing-value marker ({', '.join(MISSING_TEXT)}), and a numeric "
             "(float or decimal) id column must hold whole numbers")
_HOW_TO_FIX = {
    TIMESTAMP: "use epoch seconds or ISO-8601, or set data.timestamp_format (e.g. '%d/%m/%Y %H:%M'); a text "
               "column whose first value is a whole number is read as whole numbers throughout",
    WEIGHT: "weights must be numbers",
    EVENT_TYPE: "event types must be text (e.g. view, cart, buy) or whole-number codes; fix data.event_type_col",
}
_ID_KEYS = {USER_ID: "user_id_type", ITEM_ID: "item_id_type"}
NO_ROWS = "it has no rows (only a header, or only blank lines); point data.path at a file with events"


def how_to_fix(name: str, id_types: dict[str, str] | None = None) -> str:
    """What to do about a bad value of canonical column ``name`` (ids: by their type, int unless said)."""
    if name in _ID_KEYS:
        kind = (id_types or {}).get(name, "int")
        return _TEXT_IDS if kind == "string" else _INT_IDS.format(key=_ID_KEYS[name])
    return _HOW_TO_FIX[name]


def _floor_to_int(col: pl.Expr) -> pl.Expr:
    return pl.when(col.is_finite()).then(col.floor()).cast(pl.Int64, strict=False)


_INTEGRAL_FLOAT_TEXT = r"^([+-]?\d+)\.0*$"  # "2.0", "-7.", "12.000"


def id_expr(dtype: pl.DataType, name: str, kind: str = "int") -> pl.Expr:
    """The id column ``name`` as ``kind`` (schema.ID_DTYPES) from an integer, integral-float or string column;
    null where the value is not an id: for ``int`` not a whole number in the Int64 range, for ``string`` a
    blank text, a missing-value marker (:data:`MISSING_TEXT`) or a float with a fraction (integers and integral floats are written in decimal: 7.0 → "7");
    for ``int``, text of an integral float ("7.0") is that whole number."""
    col = pl.col(name)
    if dtype.is_integer():  # straight to text: a UInt64 above the Int64 range is a valid text id
        return col.cast(pl.String) if kind == "string" else col.cast(pl.Int64, strict=False)
    if dtype.is_float():
        as_int = pl.when(col == col.floor()).then(col).cast(pl.Int64, strict=False)
        return as_int.cast(pl.String) if kind == "string" else as_int
    if isinstance(dtype, pl.Decimal):  # SQL NUMBER(p, s): a whole number is written without its zero fraction
        # (7.00 -> "7", as the integer 7 and the float 7.0 are), one with a fraction is no id (as the float 7.5)
        text = col.cast(pl.String).str.replace(r"\.0*$", "")
        whole = pl.when(text.str.contains(r"^-?\d+$")).then(text)
        return whole if kind == "string" else whole.cast(pl.Int64, strict=False)
    text = col.cast(pl.String).str.strip_chars()
    if kind == "string":
        return pl.when((text.str.len_bytes() > 0) & ~text.is_in(MISSING_TEXT)).then(text)
    # an integral float as text ("2.0", what pandas writes for an int column with a NaN) is that whole number;
    # matched as text, so a long id never goes through a float's 53 bits (when/then: 3x faster than coalesce)
    as_int = text.cast(pl.Int64, strict=False)
    integral = text.str.replace(_INTEGRAL_FLOAT_TEXT, "${1}").cast(pl.Int64, strict=False)
    return pl.when(as_int.is_null()).then(integral).otherwise(as_int)


def timestamp_expr(dtype: pl.DataType, timestamp_format: str | None, sample: str | None = None) -> pl.Expr:
    """Int64 epoch seconds; null where the value cannot be parsed.

    Integers pass through, floats are floored, datetimes/dates become epoch seconds (UTC). Strings are parsed
    with ``timestamp_format`` if given; else, when ``sample`` (the first value) is an integer, as integers
    only (the common, fast case); else per value as an integer, a float or one of :data:`ISO_FORMATS`.
    """
    col = pl.col(TIMESTAMP)
    if dtype.is_integer():
        return col.cast(pl.Int64, strict=False)
    if dtype.is_float():
        return _floor_to_int(col)
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.epoch("s")
    if isinstance(dtype, pl.Datetime):
        return col.dt.epoch("s")
    text = col.cast(pl.String).str.strip_chars()
    if timestamp_format is not None:
        return text.str.to_datetime(timestamp_format, strict=False).dt.epoch("s")
    as_int = text.cast(pl.Int64, strict=False)
    if sample is not None and pl.Series([sample.strip()]).cast(pl.Int64, strict=False)[0] is not None:
        return as_int
    parsed = [text.str.to_datetime(fmt, strict=False).dt.epoch("s") for fmt in ISO_FORMATS]
    return pl.coalesce(as_int, _floor_to_int(text.cast(pl.Float64, strict=False)), *parsed)


def weight_expr(dtype: pl.DataType) -> pl.Expr:
    """Float64 weight (e.g. a rating); null where a non-null value is not a number."""
    col = pl.col(WEIGHT)
    if dtype.is_numeric():
        return col.cast(pl.Float64)
    return col.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)


def event_type_expr(col: pl.Expr) -> pl.Expr:
    """Event type names as the pipeline reads them: trimmed like the ids (" view" is a view); a blank one or a
    missing-value marker ("NULL") is no type (null). The features job and the pyfunc model both read types so."""
    text = col.cast(pl.String).str.strip_chars()
    return pl.when((text != "") & ~text.is_in(MISSING_TEXT)).then(text)


def typed_exprs(
    raw: pl.LazyFrame, timestamp_format: str | None, id_types: dict[str, str] | None = None
) -> dict[str, pl.Expr]:
    """Canonical column name -> expression converting the raw column (only columns present in ``raw``);
    ``id_types`` maps ``user_id`` / ``item_id`` to ``int`` (the default) or ``string``.

    Peeks at the first non-null timestamp when timestamps are strings without a format (see
    :func:`timestamp_expr`); may raise polars errors (unreadable file), which the caller wraps.
    """
    schema = raw.collect_schema()
    sample = None
    if schema[TIMESTAMP] == pl.String and timestamp_format is None:
        sample = raw.select(pl.col(TIMESTAMP).drop_nulls().first()).collect().item()
    exprs = {
        USER_ID: id_expr(schema[USER_ID], USER_ID, (id_types or {}).get(USER_ID, "int")),
        ITEM_ID: id_expr(schema[ITEM_ID], ITEM_ID, (id_types or {}).get(ITEM_ID, "int")),
        TIMESTAMP: timestamp_expr(schema[TIMESTAMP], timestamp_format, sample),
    }
    if EVENT_TYPE in schema:
        exprs[EVENT_TYPE] = event_type_expr(pl.col(EVENT_TYPE))
    if WEIGHT in schema:
        exprs[WEIGHT] = weight_expr(schema[WEIGHT])
    return {name: expr.alias(name) for name, expr in exprs.items()}


def _id_dtype(dtype: pl.DataType) -> bool:
    """Numbers, text, and what text or numbers are stored as: pandas' category, SQL's decimal(20, 0); and
    Null (a Parquet column with no value at all, e.g. an upstream join that lost every id), whose rows are
    then reported as missing values, not as a dtype to change."""
    return dtype.is_numeric() or dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)


def dtype_problems(schema: pl.Schema, labels: dict[str, str], id_types: dict[str, str] | None = None) -> list[str]:
    """Columns whose dtype can never convert (e.g. a Boolean or List id column)."""
    accepted = {
        USER_ID: _id_dtype,
        ITEM_ID: _id_dtype,
        TIMESTAMP: lambda d: d.is_numeric() or d in (pl.Date, pl.String, pl.Null) or isinstance(d, pl.Datetime),
        # Null (dtype): an optional column left empty, e.g. a day's partition whose events have no type
        WEIGHT: lambda d: d.is_numeric() or d in (pl.String, pl.Null),
        EVENT_TYPE: lambda d: d.is_integer() or d in (pl.String, pl.Categorical, pl.Null) or isinstance(d, pl.Enum),
    }
    return [
        f"column {labels[name]} has dtype {schema[name]}, which cannot hold a {name}; {how_to_fix(name, id_types)}"
        for name, ok in accepted.items()
        if name in schema and not ok(schema[name])
    ]


def _stat_exprs(name: str, typed: pl.Expr, required: bool) -> list[pl.Expr]:
    raw = pl.col(name)
    bad = raw.is_not_null() & typed.is_null()
    missing = raw.is_null() if required else pl.lit(False)
    return [
        missing.sum().alias(f"{name}:missing"),
        pl.col(POS).filter(missing).first().alias(f"{name}:missing_pos"),
        bad.sum().alias(f"{name}:bad"),
        pl.col(POS).filter(bad).first().alias(f"{name}:bad_pos"),
        raw.filter(bad).first().cast(pl.String).alias(f"{name}:example"),
    ]


def _describe(stats: dict, name: str, label: str, unit: str, id_types: dict[str, str] | None) -> list[str]:
    out = []
    if stats[f"{name}:missing"]:
        out.append(
            f"column {label}: {stats[f'{name}:missing']} row(s) have an empty/null value "
            f"(first at {unit} {stats[f'{name}:missing_pos']}); every event needs a {name}"
        )
    if stats[f"{name}:bad"]:
        out.append(
            f"column {label}: {stats[f'{name}:bad']} value(s) cannot be read as {name} "
            f"(e.g. {stats[f'{name}:example']!r} at {unit} {stats[f'{name}:bad_pos']}); {how_to_fix(name, id_types)}"
        )
    return out


# Epoch timestamps of 1973-2500 by their unit's magnitude: seconds below 1e11 (year 5138), milliseconds below 1e14,
# microseconds below 1e17, nanoseconds above
_UNIT_BOUNDS = ((10**11, "seconds"), (10**14, "milliseconds"), (10**17, "microseconds"))


def timestamp_unit(value: int) -> str:
    """The epoch unit an integer timestamp of years 1973-2500 has at this magnitude (see _UNIT_BOUNDS)."""
    return next((unit for bound, unit in _UNIT_BOUNDS if abs(value) < bound), "nanoseconds")


def mixed_units(spans: dict[str, tuple[int, int]]) -> str | None:
    """A sentence naming two sources whose timestamps are in different units (each source's earliest and latest
    of one unit's magnitude; a source spanning two, as a stray far-future value makes, is not judged), else None."""
    first: dict[str, tuple[str, tuple[int, int]]] = {}
    for source, (lo, hi) in spans.items():
        if timestamp_unit(lo) == timestamp_unit(hi):
            first.setdefault(timestamp_unit(lo), (source, (lo, hi)))
    if len(first) < 2:
        return None
    (unit_a, (a, span_a)), (unit_b, (b, span_b)) = list(first.items())[:2]
    return (f"the files mix timestamp units: {a} holds {span_a[0]}..{span_a[1]} ({unit_a}, by magnitude) and {b} "
            f"{span_b[0]}..{span_b[1]} ({unit_b}); read together their events would be out of time order. Export "
            "every file in one unit (an exporter changed its unit?), or read them apart")


def _warn_future(stats: dict, label: str, source: str) -> None:
    """Timestamps after now are kept (only their order matters) but usually mean a wrong unit: say so."""
    if not stats["future"]:
        return
    year = 1970 + stats["latest"] // _SECONDS_PER_YEAR
    logger.warning(
        "%s: column %s: %d timestamp(s) lie in the future (latest %d, about year %d as epoch seconds); "
        "kept as given. If they are milliseconds, use that unit for features.val_cutoff/test_cutoff too",
        source, label, stats["future"], stats["latest"], year,
    )


def find_problems(
    raw: pl.LazyFrame, typed: dict[str, pl.Expr], labels: dict[str, str], unit: str, source: str = "input",
    id_types: dict[str, str] | None = None, short_line: Callable[[], str | None] | None = None,
    spans: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    """Every problem with the values of ``raw``, found in ONE aggregate pass over the data.

    ``typed`` comes from :func:`typed_exprs`; ``labels`` maps a canonical column to how the user knows it
    (e.g. ``"'uid' (data.user_col)"``); ``unit`` names what ``_pos`` counts ("data row" or "line").
    When ``raw`` has a :data:`SHORT` column that is true somewhere, ``short_line`` (the reader's) returns the
    sentence naming the first line with too few fields, or None if there is none; it comes first.
    Returns [] when the input is usable; then logs a warning (naming ``source``) for timestamps in the
    future, and sets ``spans[source]`` (when given) to its (earliest, latest) timestamp. May raise polars errors
    (unreadable file); the caller wraps them.
    """
    schema = raw.collect_schema()
    problems = dtype_problems(schema, labels, id_types)
    if problems:  # a file without rows has no type to hold (e.g. Null columns of an empty pandas frame)
        return [NO_ROWS] if raw.select(pl.len()).collect().item() == 0 else problems
    checked = [name for name in (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT) if name in schema]
    aggs = [pl.len().alias("rows")]
    for name in checked:
        aggs += _stat_exprs(name, typed[name], required=name != WEIGHT)
    ts = typed[TIMESTAMP]
    aggs += [(ts > int(time.time())).sum().alias("future"), ts.max().alias("latest"), ts.min().alias("earliest"),
             _sub_second(schema[TIMESTAMP]).sum().alias("sub_second")]
    if SHORT in schema:
        aggs.append(pl.col(SHORT).any().alias("short"))
    stats = raw.select(aggs).collect().row(0, named=True)
    if stats["rows"] == 0:
        return [NO_ROWS]
    problems = [line for name in checked for line in _describe(stats, name, labels[name], unit, id_types)]
    if stats.get("short") and short_line is not None and (line := short_line()):
        problems.insert(0, line)
    if not problems:
        if spans is not None:
            spans[source] = (stats["earliest"], stats["latest"])
        _warn_future(stats, labels[TIMESTAMP], source)
        if stats["sub_second"]:
            logger.warning(
                "%s: column %s: %d timestamp(s) have a fraction of a second; timestamps are whole epoch seconds, "
                "so events of a user within the same second keep their order in the file (sort the file by "
                "time, or give integer milliseconds as the timestamp, to keep their order), and two events of "
                "the same item within one second are identical to features.dedup=exact (counted as duplicate)",
                source, labels[TIMESTAMP], stats["sub_second"])
    return problems


# A value with a non-zero fraction of a second: "1700000000.25", or ISO-8601 "…T12:00:00.250"
_FRACTION_TEXT = r"^\s*[+-]?\d+\.\d*[1-9]\d*\s*$|[T ]\d{2}:\d{2}:\d{2}[.,]\d*[1-9]"


def _sub_second(dtype: pl.DataType) -> pl.Expr:
    """True where the raw timestamp has a fraction of a second, which reading it as epoch seconds drops."""
    col = pl.col(TIMESTAMP)
    if dtype.is_float():
        return col.is_finite() & (col != col.floor())
    if isinstance(dtype, pl.Datetime) and dtype.time_unit != "s":
        return col.dt.epoch(dtype.time_unit) % {"ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[dtype.time_unit] != 0
    if dtype == pl.String:
        return col.str.contains(_FRACTION_TEXT)
    if isinstance(dtype, pl.Decimal):  # read through its text, as a string column ("100.900")
        return col.cast(pl.String).str.contains(_FRACTION_TEXT)
    return pl.lit(False)
