"""Run the real ``recsys`` entry point in-process and judge what a user would see and what is left on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.cli import main


@dataclass(frozen=True)
class Outcome:
    """Exit code and captured console output of one ``recsys`` call."""

    code: int
    out: str
    err: str

    @property
    def console(self) -> str:
        return self.out + self.err


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    """``pipelines.cli.main(argv)`` with stdout/stderr captured; a SystemExit (argparse) becomes its code."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def features_argv(work: Path, path: Path, *overrides: str) -> list[str]:
    """``recsys features`` on ``path`` into ``work`` without tracking (the fast path of most cases)."""
    return [
        "features",
        "--quiet",
        f"work_dir={work}",
        f"data.path={path}",
        "tracking.enabled=false",
        *overrides,
    ]


def half_written(work: Path) -> list[Path]:
    """Temporary or replaced directories that an atomic write leaves behind when it is interrupted."""
    if not work.exists():
        return []
    return [p for p in work.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), to compare a directory byte for byte."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def assert_user_error(outcome: Outcome, code: int, *expected: str) -> None:
    """Exit ``code``, every ``expected`` text on stderr, and no Python traceback anywhere on the console."""
    assert outcome.code == code, f"exit {outcome.code}, expected {code}; stderr:\n{outcome.err}"
    assert "Traceback" not in outcome.console, outcome.console
    for text in expected:
        assert text in outcome.err, f"{text!r} not on stderr:\n{outcome.err}"


def assert_no_output(work: Path) -> None:
    """No feature set and nothing half-written in ``work`` (logs are allowed)."""
    assert not (work / "features").exists(), sorted(p.name for p in work.iterdir())
    assert half_written(work) == []
