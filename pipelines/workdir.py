"""Where each job reads and writes inside ``work_dir``."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from features import schema
from features.artifacts import FeatureSet
from features.schema import FEATURE_FILES
from recsys.config import Config
from recsys.storage import fingerprint
from recsys.tracking import JobRun


def dated_partitions(paths: Iterable[Path]) -> list[tuple[dt.date, Path]]:
    """``(date, path)`` of the ``date=YYYY-MM-DD`` directories and ``date=YYYY-MM-DD.json`` records (completion
    markers, retention records) among ``paths``; other names are skipped."""
    out = []
    for path in paths:
        try:
            out.append((dt.date.fromisoformat(path.name.removeprefix("date=").removesuffix(".json")), path))
        except ValueError:
            continue
    return out


def log_features_input(tracker: JobRun, features: Path, feats: FeatureSet, context: str) -> None:
    """Record the features directory as the MLflow run's input dataset "features" (the sequences' schema and
    row count; digest = SHA-256 of its manifest, the same for every job reading that build)."""
    digest = fingerprint(features / FEATURE_FILES["manifest"])["sha256"]
    tracker.log_dataset(feats.sequences, "features", features, digest, context)


def content_digest(model_dir: Path) -> str:
    """SHA-256 of what the model in ``model_dir`` scores with: weights, constructor arguments, the carried feature
    tables there (the ``content_sha256`` tag of its registered version; from the files alone, so evaluate gets
    the same digest whatever the features hold now)."""
    from recsys.model import KWARGS_FILE, WEIGHTS_FILE  # torch: not for every user of this module

    optional = [schema.ITEM_FEATURE_FILES["item_feature_values"], schema.EVENT_TYPE_FILES["event_types"]]
    names = [WEIGHTS_FILE, KWARGS_FILE, schema.FEATURE_FILES["user_map"], schema.FEATURE_FILES["item_map"],
             *(name for name in optional if (model_dir / name).is_file())]
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with (model_dir / name).open("rb") as fh:  # streamed: the weights of a large catalogue are GBs
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class WorkDir:
    root: Path

    @classmethod
    def of(cls, cfg: Config) -> WorkDir:
        return cls(Path(cfg.work_dir))

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    def candidates_partition(self, day: dt.date, shard: str | None = None) -> Path:
        """The published candidates of one night, ``candidates/date=YYYY-MM-DD``, or of one shard of a split
        night, ``candidates/<shard>/date=YYYY-MM-DD`` (``shard`` is a directory name such as ``shard=0-of-4``).

        Shard first: each shard writes (and cleans temporary files) only in its own directory, so shards
        running at the same time, on other hosts too, never touch each other's files.
        """
        base = self.candidates if shard is None else self.candidates / shard
        return base / f"date={day.isoformat()}"

    def rejected_candidates(self, day: dt.date, shard: str | None = None) -> Path:
        """Where a night (or a shard of it) that failed the drift gate is kept for inspection (never read by
        consumers): ``candidates/rejected[/<shard>]/date=YYYY-MM-DD``."""
        base = self.candidates / "rejected"
        return (base if shard is None else base / shard) / f"date={day.isoformat()}"

    def candidate_shards(self, day: dt.date) -> list[str]:
        """Names of the shard directories (``shard=i-of-N``) holding a published partition of ``day``."""
        return sorted(p.parent.name for p in self.candidates.glob(f"shard=*/date={day.isoformat()}"))

    def previous_candidates(self, day: dt.date, shard: str | None = None) -> list[Path]:
        """The published partitions of the latest night dated strictly before ``day`` (empty: none).

        That night may be written in any layout: whole, or as ``shard`` (split the same way), or as ALL N
        shards of another split (after a change of shard count; a night with a shard missing is skipped).
        The caller keeps only ``shard``'s users. On one date: the same shard, else whole, else the shards.
        """
        def published(root: Path) -> dict[dt.date, Path]:
            return {when: path for when, path in dated_partitions(root.glob("date=*"))
                    if when < day and (path / "candidates.parquet").is_file()}

        nights: list[tuple[dt.date, int, list[Path]]] = []
        if shard is not None:
            nights += [(when, 2, [path]) for when, path in published(self.candidates / shard).items()]
        nights += [(when, 1, [path]) for when, path in published(self.candidates).items()]
        splits: dict[int, dict[int, dict[dt.date, Path]]] = {}  # count -> index -> that shard's nights
        for directory in self.candidates.glob("shard=*-of-*"):
            index, _, count = directory.name.removeprefix("shard=").partition("-of-")
            if directory.name != shard and index.isdigit() and count.isdigit():
                splits.setdefault(int(count), {})[int(index)] = published(directory)
        for count, shards in splits.items():
            if set(shards) != set(range(count)):
                continue
            for when in set.intersection(*(set(s) for s in shards.values())):
                nights.append((when, 0, [shards[i][when] for i in range(count)]))
        return max(nights, key=lambda night: night[:2])[2] if nights else []

    def expired_candidates(self, day: dt.date, keep_days: int, shard: str | None = None) -> list[Path]:
        """Partitions, published and rejected, dated ``keep_days`` days or more before ``day``: for a whole night
        (``shard`` None) of the whole nights and of every shard directory (nights of an earlier split, which no
        shard job of tonight's layout prunes); for a shard, of that shard's directory (each shard prunes its
        own), and for shard 0 of a split also of every OTHER layout: the whole nights and the shard directories
        of another count (nights written before the split or before a change of N, which no other job of
        tonight's layout prunes; one shard only, so that N shards never race on one path). Sorted."""
        oldest_kept = day - dt.timedelta(days=keep_days - 1)
        top = [self.candidates, self.candidates / "rejected"]
        every = top + [directory for root in top for directory in root.glob("shard=*-of-*")]
        if shard is None:
            roots = every
        else:
            roots = [root / shard for root in top]
            index, _, count = shard.removeprefix("shard=").partition("-of-")
            if index == "0":
                roots += [root for root in every if not root.name.endswith(f"-of-{count}")]
        return sorted(path for root in roots for when, path in dated_partitions(root.glob("date=*"))
                      if when < oldest_kept and path.is_dir())

    def night_marker(self, day: dt.date) -> Path:
        """``candidates/complete/date=YYYY-MM-DD.json``: written once every part of night ``day`` is published
        (the whole night, or all N shards from one model and one feature build); what a consumer waits for."""
        return self.candidates / "complete" / f"date={day.isoformat()}.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
