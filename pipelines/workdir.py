"""Where each job reads and writes inside ``work_dir``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from recsys.config import Config


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

    def candidates_partition(self, day: dt.date) -> Path:
        """The published candidates of one night: ``candidates/date=YYYY-MM-DD``."""
        return self.candidates / f"date={day.isoformat()}"

    def rejected_candidates(self, day: dt.date) -> Path:
        """Where a night that failed the drift gate is kept for inspection (never read by consumers)."""
        return self.candidates / "rejected" / f"date={day.isoformat()}"

    def previous_candidates(self, day: dt.date) -> Path | None:
        """The latest published partition dated strictly before ``day``, or None."""
        dated = []
        for path in self.candidates.glob("date=*"):
            try:
                when = dt.date.fromisoformat(path.name.removeprefix("date="))
            except ValueError:
                continue
            if when < day and (path / "candidates.parquet").is_file():
                dated.append((when, path))
        return max(dated)[1] if dated else None

    @property
    def logs(self) -> Path:
        return self.root / "logs"
