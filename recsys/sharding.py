"""User shards: candidate generation split into N independent jobs (``recsys candidates --shard i/N``).

A user's shard is a function of the EXTERNAL ``user_id`` alone (a 64-bit mix of the id, or a hash of a text id,
modulo N), so a user stays in the same shard night after night, whatever the feature job's internal indices or
the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import polars as pl

from features import schema
from features.artifacts import FeatureSet

# splitmix64's finaliser (Steele et al., 2014): every input bit moves every output bit, so ids that share a
# pattern (all even, steps of 1000) still spread evenly over the shards.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_SHARD = re.compile(r"(?P<index>\d+)/(?P<count>\d+)")


class ShardLayoutError(ValueError):
    """A night's candidates would mix layouts: unsharded and sharded, or shards of two different N."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in 0..count-1, got {self.index}/{self.count}")

    @property
    def name(self) -> str:
        """Directory name of the shard's output: ``shard=i-of-N``."""
        return f"shard={self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/N"`` (0 <= i < N) → :class:`Shard`; raises ``ValueError`` saying what is expected."""
    match = _SHARD.fullmatch(text.strip())
    if match is None or not 0 <= int(match["index"]) < int(match["count"]):
        raise ValueError(f"{text!r} is not a shard: expected i/N with 0 <= i < N (0-based), e.g. 0/4 … 3/4")
    return Shard(int(match["index"]), int(match["count"]))


def shard_of(user_id: pl.Expr, count: int, dtype: pl.DataType = pl.Int64) -> pl.Expr:
    """0-based shard (UInt64) of each external user id of ``dtype`` (Int64 or String, data.user_id_type).

    Int64: splitmix64's finaliser of the id, modulo ``count``; the id's 64 bits are read as unsigned (negative
    ids included), UInt64 arithmetic wraps around, and ``x // 2**s`` is the right shift ``x >> s``.
    String: the BLAKE2b digest of the id's UTF-8 bytes with an 8-byte digest size (not the first 8 bytes of the
    default 64-byte digest), read little-endian, modulo ``count``:
    a fixed function of the text (polars' own ``hash`` may change between versions, which would move users
    between shards after an upgrade).
    """
    return user_hash(user_id, dtype) % count


def user_hash(user_id: pl.Expr, dtype: pl.DataType = pl.Int64) -> pl.Expr:
    """The UInt64 hash :func:`shard_of` takes modulo the shard count: a fixed function of the external id."""
    if dtype == pl.String:
        return user_id.map_batches(text_hash, return_dtype=pl.UInt64)
    z = user_id.cast(pl.UInt64, wrap_numerical=True) + pl.lit(_GOLDEN, dtype=pl.UInt64)
    z = z.xor(z // 2**30) * pl.lit(_MIX1, dtype=pl.UInt64)
    z = z.xor(z // 2**27) * pl.lit(_MIX2, dtype=pl.UInt64)
    return z.xor(z // 2**31)


def text_hash(ids: pl.Series) -> pl.Series:
    """UInt64 BLAKE2b-64 of each text id (about a microsecond per id: a million users in about a second)."""
    digests = (hashlib.blake2b(text.encode(), digest_size=8).digest() for text in ids.to_list())
    return pl.Series(ids.name, [int.from_bytes(d, "little") for d in digests], dtype=pl.UInt64)


def in_shard(shard: Shard, dtype: pl.DataType = pl.Int64) -> pl.Expr:
    """Filter predicate: the row's ``user_id`` (of ``dtype``) belongs to ``shard``."""
    return shard_of(pl.col(schema.USER_ID), shard.count, dtype) == shard.index


def select_shard(feats: FeatureSet, shard: Shard) -> FeatureSet:
    """``feats`` with only the sequences of the users of ``shard`` (id maps and manifest unchanged)."""
    users = feats.user_map.filter(in_shard(shard, feats.user_map.schema[schema.USER_ID]))[schema.USER_IDX]
    sequences = feats.sequences.filter(pl.col(schema.USER_IDX).is_in(users.implode()))
    return dataclasses.replace(feats, sequences=sequences)
