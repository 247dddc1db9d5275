"""Where each job reads and writes inside ``work_dir``."""

from __future__ import annotations

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

    @property
    def logs(self) -> Path:
        return self.root / "logs"
