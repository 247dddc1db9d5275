"""RECSYS_LOG_FORMAT=json: every log line, on stderr and in the log file, is one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipelines.cli import EXIT_INPUT, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from pipelines.schedule import job_lock

TINY = ["data.source=synthetic", "data.synthetic.n_users=50", "data.synthetic.n_items=20", "tracking.enabled=false"]


def _recsys(*args: str, fmt: str) -> subprocess.CompletedProcess:
    env = {"RECSYS_LOG_FORMAT": fmt, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)


def _records(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


def test_json_logs_on_stderr_and_in_the_file(tmp_path):
    done = _recsys("features", f"work_dir={tmp_path / 'work'}", *TINY, fmt="json")
    assert done.returncode == EXIT_OK, done.stderr
    console = _records(done.stderr)
    assert console and {"time", "level", "logger", "message", "job", "pid"} <= set(console[0])
    assert any(r["message"].startswith("reading") or "rows" in r["message"] for r in console)
    assert all(r["job"] == "features" and r["time"].endswith("+00:00") for r in console)
    (log_file,) = (tmp_path / "work" / "logs").glob("features-*.log")
    in_file = _records(log_file.read_text())
    assert [r["message"] for r in in_file] == [r["message"] for r in console]


def test_json_logs_carry_the_error(tmp_path):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,timestamp\n1,x,3\n")
    done = _recsys("features", f"work_dir={tmp_path / 'work'}", f"data.path={bad}", "tracking.enabled=false",
                   fmt="json")
    assert done.returncode == EXIT_INPUT
    errors = [r for r in _records(done.stderr) if r["level"] == "ERROR"]
    assert errors and "'x'" in errors[0]["message"] and "data.item_id_type" in errors[0]["message"]


def test_unknown_log_format_is_a_usage_error(tmp_path):
    done = _recsys("features", f"work_dir={tmp_path / 'work'}", *TINY, fmt="jsno")
    assert done.returncode == EXIT_USAGE and "RECSYS_LOG_FORMAT='jsno'" in done.stderr


def test_json_stderr_stays_json_for_a_config_error_and_a_held_lock(tmp_path):
    """Before: a config error was plain text only, a held lock its JSON line plus the same in plain text."""
    done = _recsys("features", f"work_dir={tmp_path / 'work'}", *TINY, "train.lrr=1", fmt="json")
    assert done.returncode == EXIT_USAGE
    (record,) = _records(done.stderr)
    assert record["level"] == "ERROR" and "train.lrr: unknown key" in record["message"]

    (tmp_path / "work").mkdir()
    with job_lock(tmp_path / "work", "features"):
        done = _recsys("features", f"work_dir={tmp_path / 'work'}", *TINY, fmt="json")
    assert done.returncode == EXIT_LOCKED
    (record,) = _records(done.stderr)
    assert record["job"] == "features" and "features" in record["message"]


def test_python_warnings_and_usage_errors_stay_json(tmp_path):
    """A library's warning (Lightning's deprecation notices during `recsys train`) and argparse's usage errors
    were printed as plain text among the JSON lines."""
    script = ("import warnings; from pipelines.cli import _setup_logging; from recsys.config import load_config; "
              f"_setup_logging(load_config(None, ['work_dir={tmp_path}']), 'train', quiet=True); "
              "warnings.warn('a library notice', UserWarning)")
    env = {"RECSYS_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    (record,) = _records(done.stderr)
    assert record["level"] == "WARNING" and "a library notice" in record["message"]
    (log_file,) = (tmp_path / "logs").glob("train-*.log")
    assert "a library notice" in _records(log_file.read_text())[0]["message"]
    done = _recsys("status", f"work_dir={tmp_path}", "--bogus", fmt="json")
    assert done.returncode == EXIT_USAGE
    (record,) = _records(done.stderr)
    assert record["level"] == "ERROR" and "unrecognized arguments: --bogus" in record["message"]
    done = _recsys("nosuchjob", fmt="json")
    assert done.returncode == EXIT_USAGE and "invalid choice: 'nosuchjob'" in _records(done.stderr)[0]["message"]
    done = _recsys("status", f"work_dir={tmp_path}", "--bogus", fmt="text")  # text: argparse's usage, as before
    assert done.returncode == EXIT_USAGE and done.stderr.startswith("usage: recsys")
