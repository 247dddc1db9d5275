"""Logs stay bounded on a nightly schedule: old log files are removed (log_keep_days), and a partitioned input
is one log line, not one per partition (which grew every night's log by a line per past night)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.cli import EXIT_OK, main

TINY = ["data.source=synthetic", "data.synthetic.n_users=50", "data.synthetic.n_items=20", "tracking.enabled=false"]


def _aged(path: Path, days: float) -> Path:
    path.write_text("an earlier night\n")
    then = time.time() - days * 86_400
    os.utime(path, (then, then))
    return path


def test_logs_older_than_log_keep_days_are_removed_when_a_job_starts(tmp_path: Path) -> None:
    logs = tmp_path / "work" / "logs"
    logs.mkdir(parents=True)
    old = [_aged(logs / "run-20240101-023000.log", 10), _aged(logs / "train-20240102-023000.log", 3.5)]
    recent = _aged(logs / "run-20240105-023000.log", 2.5)
    other = _aged(logs / "notes.txt", 30)  # not a log of ours
    assert main(["features", "--quiet", f"work_dir={tmp_path / 'work'}", *TINY, "log_keep_days=3"]) == EXIT_OK
    assert not any(path.exists() for path in old) and recent.exists() and other.exists()
    (new,) = logs.glob("features-*.log")
    assert "log_keep_days=3: removed 2 log files" in new.read_text()
    # without the key every log is kept
    assert main(["features", "--quiet", f"work_dir={tmp_path / 'work'}", *TINY]) == EXIT_OK
    assert recent.exists() and len(list(logs.glob("features-*.log"))) >= 1


def test_a_partitioned_input_is_one_log_line_not_one_per_file(tmp_path: Path) -> None:
    events = tmp_path / "events"
    for day in range(1, 6):
        part = events / f"date=2024-05-0{day}"
        part.mkdir(parents=True)
        rows = "".join(f"{u},{(u + day) % 7 + 1},{day * 86_400 + u}\n" for u in range(1, 30))
        (part / "part-0.csv").write_text("user_id,item_id,timestamp\n" + rows)
    code = main(["features", "--quiet", f"work_dir={tmp_path / 'work'}", "data.source=file", f"data.path={events}",
                 "data.format=csv", "data.timestamp_col=timestamp", "features.min_user_events=1",
                 "tracking.enabled=false"])
    assert code == EXIT_OK
    (log,) = (tmp_path / "work" / "logs").glob("features-*.log")
    reading = [line for line in log.read_text().splitlines() if " reading " in line]
    assert len(reading) == 1 and "reading 5 files of" in reading[0], reading
    assert "date=2024-05-01" in reading[0] and "date=2024-05-05" in reading[0]
