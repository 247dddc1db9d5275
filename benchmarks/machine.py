"""Where and at which commit a scale benchmark ran, its peak memory, and appending its row to BENCHMARKS.md
or its record to a JSON-lines file."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine(device: torch.device | None = None) -> str:
    """CPU model, cores this process may use, RAM and torch version; plus the GPU on a CUDA device."""
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"CPU {model}, {len(os.sched_getaffinity(0))} cores, {ram:.0f} GiB RAM, torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        text = f"GPU {torch.cuda.get_device_name(device)}; {text}"
    return text


def commit() -> str:
    """Short HEAD hash, ``+dirty`` when tracked files differ from it; ``RECSYS_BENCH_COMMIT`` when set (a copy
    of the tree whose git metadata is not the checkout's, as on the lent GPU machine, benchmarks/device/)."""
    if os.environ.get("RECSYS_BENCH_COMMIT"):
        return os.environ["RECSYS_BENCH_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        return (git("rev-parse", "--short", "HEAD") or "unknown") + (
            "+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_1min() -> float:
    """1-minute load average: above ~0.5 per spare core, other jobs shared the machine."""
    return os.getloadavg()[0]


def append_row(path: Path, title: str, intro: str, header: str, row: str) -> None:
    """Append ``row`` to the table under ``## title`` in ``path``, creating section and table if missing."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    marker = f"## {title}\n"
    if marker not in text:
        text = text.rstrip("\n") + f"\n\n{marker}\n{intro.strip()}\n\n{header}\n"
    head, _, tail = text.partition(marker)
    section, later, rest = tail.partition("\n## ")  # only this section's table, not a later one
    lines = section.rstrip("\n").split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))
    lines.insert(last + 1, row)
    path.write_text(head + marker + "\n".join(lines) + "\n" + (f"\n## {rest}" if later else ""))


def jsonable(value: object) -> object:
    """``value`` as JSON can hold it: named tuples as objects, tuples as lists, paths and devices as text, numpy and
    torch scalars as numbers (a script's measurements and arguments, for its JSON-lines record)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "_asdict"):
        return jsonable(value._asdict())
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return str(value)


def check_json_out(path: Path | None) -> None:
    """Stop at once (SystemExit naming it) if a ``--json-out`` file could not be appended to at the end."""
    if path is not None and not path.parent.is_dir():
        raise SystemExit(f"--json-out {path}: directory {path.parent} does not exist")


def append_record(path: Path | None, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (nothing when None): finished runs survive a killed batch."""
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def emit(record: dict, path: Path | None, records: list[dict]) -> dict:
    """Stamp ``record`` with the machine's load, the machine, the commit and the date; print it, append it
    to ``path`` (see :func:`append_record`) and to ``records``; return it."""
    record = {**record, "load_1min": load_1min(), "machine": machine(), "commit": commit(),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(record), flush=True)
    append_record(path, record)
    records.append(record)
    return record


def read_records(paths: list[Path]) -> list[dict]:
    """The JSON-lines records of ``paths``, in order; a line that is not JSON stops with its file and line."""
    records = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SystemExit(f"{path}:{n}: not a JSON record ({err}); was the run cut off mid-line?") from err
    return records
