"""The feature job at scale on synthetic skewed events; appends rows to BENCHMARKS.md.

    python -m benchmarks.features_scale --events 25000000 --compare-pandas
    python -m benchmarks.features_scale --events 200000000 --partitions 16

Generates seeded events as one parquet file, written in chunks so the rows never sit in memory at once (not
timed): Zipf item popularity, Pareto-tailed user activity, per-user non-decreasing timestamps (some ties) and
1% exact duplicate rows, in roughly time order like a log. Then each job runs in its own subprocess; its wall
time and peak RSS (``ru_maxrss`` of that child, from ``os.wait4``) are recorded. Jobs:

- ``polars``: the library's own ``features.build.build_features`` (``data.format=parquet``,
  ``features.partitions`` from ``--partitions``): validate, dedup, encode ids, sequences, leave-one-out split.
- ``pandas`` (``--compare-pandas``): a plain pandas implementation of the same job, kept here only (pandas is
  no dependency of the library). Its sequences are checked equal to the polars ones after the runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl

from features.build import build_features
from features.schema import FEATURE_FILES, ITEM_ID, ITEM_IDX, TIMESTAMP, USER_ID, USER_IDX
from recsys.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Feature job at scale (synthetic events)"
_TABLE_HEADER = (
    "| date | events | users | items | job | partitions | wall s | CPU s | peak RSS GB | pandas / polars wall "
    "| load 1 min (before → after) | machine | command | commit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
_START = 1_600_000_000  # epoch seconds of the first event
_SPAN = 365 * 86_400  # first events fall in its first half; later ones may run past it
_MASK63 = np.uint64((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- data


def _sparse_ids(dense: np.ndarray, multiplier: int) -> np.ndarray:
    """Distinct non-negative Int64 ids scattered over 0..2^63 (odd multiplier mod 2^63 is a bijection)."""
    return ((dense.astype(np.uint64) * np.uint64(multiplier)) & _MASK63).astype(np.int64)


def _user_lengths(rng: np.random.Generator, n_users: int) -> np.ndarray:
    """(n_users,) events per user: 1 + Pareto(1.2) * 8, capped at 50,000 (mean ~32, median ~7)."""
    return np.minimum(1 + (rng.pareto(1.2, n_users) * 8).astype(np.int64), 50_000)


def _block(
    rng: np.random.Generator, lengths: np.ndarray, first_user: int, cdf: np.ndarray, n_copies: int
) -> pl.DataFrame:
    """Events of consecutive users with ``lengths``, plus ``n_copies`` exact copies of random rows."""
    n = int(lengths.sum())
    users = np.repeat(np.arange(first_user, first_user + len(lengths)), lengths)  # (n,)
    items = np.searchsorted(cdf, rng.random(n))  # (n,) Zipf ranks
    gaps = rng.geometric(1 / 900, n) - 1  # seconds between a user's events, ~0.1% zero (ties)
    starts = np.cumsum(lengths) - lengths  # first row of each user
    gaps[starts] = rng.integers(0, _SPAN // 2, len(lengths))  # the user's first event
    clock = np.cumsum(gaps)
    stamps = _START + clock - np.repeat(clock[starts] - gaps[starts], lengths)
    block = pl.DataFrame(
        {
            USER_ID: _sparse_ids(users + 1, 0x9E3779B97F4A7C15),
            ITEM_ID: _sparse_ids(items + 1, 0xC2B2AE3D27D4EB4F),
            TIMESTAMP: stamps.astype(np.int64),
        }
    )
    copies = block[np.sort(rng.choice(n, size=n_copies, replace=False))]
    return pl.concat([block, copies])


def generate_skewed_events(
    n_events: int, path: Path, seed: int = 0, duplicate_rate: float = 0.01, time_buckets: int = 16
) -> dict[str, int]:
    """Write exactly ``n_events`` rows (user_id, item_id, timestamp: Int64) to the parquet file ``path``.

    Users come in blocks of 200,000; each block is cut into ``time_buckets`` slices of the year, written as
    one file per (slice, block), each sorted by time; the file is the slices in order, so it reads like a log
    in rough time order. Returns the number of users and the catalogue size.
    """
    rng = np.random.default_rng(seed)
    n_items = max(1_000, n_events // 100)
    weights = 1.0 / np.arange(1, n_items + 1, dtype=np.float64)  # Zipf, exponent 1
    cdf = np.cumsum(weights) / weights.sum()
    parts = path.parent / f".{path.name}.parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    written, n_users, block_index = 0, 0, 0
    while written < n_events:
        lengths = _user_lengths(rng, 200_000)
        left = n_events - written
        n_copies = round(duplicate_rate * lengths.sum())
        if lengths.sum() + n_copies >= left:  # last block: cut it to exactly ``left`` rows
            n_copies = round(left * duplicate_rate / (1 + duplicate_rate))
            ends = np.cumsum(lengths)
            lengths = lengths[: int(np.searchsorted(ends, left - n_copies)) + 1]
            lengths[-1] -= int(lengths.sum()) - (left - n_copies)
        block = _block(rng, lengths, n_users, cdf, n_copies)
        bucket = ((pl.col(TIMESTAMP) - _START) * time_buckets // _SPAN).clip(0, time_buckets - 1)
        block = block.sort(TIMESTAMP, maintain_order=True).with_columns(bucket.alias("_bucket"))
        for (index,), rows in block.group_by("_bucket"):
            rows.drop("_bucket").write_parquet(parts / f"{index:03d}-{block_index:05d}.parquet")
        written, n_users, block_index = written + block.height, n_users + len(lengths), block_index + 1
    pl.scan_parquet(sorted(parts.glob("*.parquet"))).sink_parquet(path)
    shutil.rmtree(parts)
    return {"users": n_users, "items": n_items}


# ---------------------------------------------------------------------------------------------- jobs


def run_polars(source: Path, out: Path, partitions: int, extra: list[str] | None = None) -> None:
    """The library's feature job on ``source`` into ``out/features``, with config overrides ``extra``."""
    overrides = [f"data.path={source}", "data.format=parquet", f"work_dir={out}"]
    build_features(load_config(overrides=[*overrides, f"features.partitions={partitions}", *(extra or [])]))


def run_pandas(source: Path, out: Path) -> None:
    """The same job in plain pandas: dedup, sort, factorize ids, leave-one-out split, lists; four parquet files."""
    import pandas as pd  # here only: pandas is no dependency of the library

    events = pd.read_parquet(source, columns=[USER_ID, ITEM_ID, TIMESTAMP])
    if events.isna().to_numpy().any():
        raise ValueError(f"{source}: null ids or timestamps")
    events = events.drop_duplicates([USER_ID, ITEM_ID, TIMESTAMP], keep="first")
    events = events.sort_values([USER_ID, TIMESTAMP], kind="stable", ignore_index=True)
    user_codes, users = pd.factorize(events[USER_ID], sort=True)
    item_codes, items = pd.factorize(events[ITEM_ID], sort=True)
    encoded = pd.DataFrame(
        {
            USER_IDX: user_codes.astype(np.int32),
            ITEM_IDX: (item_codes + 1).astype(np.int32),
            TIMESTAMP: events[TIMESTAMP].to_numpy(),
        }
    )
    by_user = encoded.groupby(USER_IDX, sort=False)
    n = by_user[ITEM_IDX].transform("size").to_numpy()
    position = by_user.cumcount().to_numpy()
    last, second_last = (n >= 3) & (position == n - 1), (n >= 3) & (position == n - 2)
    encoded["split"] = np.select([last, second_last], ["test", "val"], "train")
    sequences = pd.DataFrame({USER_IDX: np.arange(len(users), dtype=np.int32)})
    for split in ("train", "val", "test"):
        lists = encoded[encoded["split"] == split].groupby(USER_IDX)[ITEM_IDX].agg(list)
        sequences[f"{split}_items"] = [lists.get(user, []) for user in sequences[USER_IDX]]
    train = encoded[encoded["split"] == "train"].groupby(ITEM_IDX).size()
    item_idx = np.arange(1, len(items) + 1, dtype=np.int32)
    out.mkdir(parents=True, exist_ok=True)
    encoded.to_parquet(out / FEATURE_FILES["events"])
    sequences.to_parquet(out / FEATURE_FILES["sequences"])
    pd.DataFrame({USER_ID: users, USER_IDX: np.arange(len(users), dtype=np.int32)}).to_parquet(
        out / FEATURE_FILES["user_map"]
    )
    counts = train.reindex(item_idx, fill_value=0).to_numpy()
    pd.DataFrame({ITEM_ID: items, ITEM_IDX: item_idx, "train_count": counts}).to_parquet(
        out / FEATURE_FILES["item_map"]
    )


def same_sequences(polars_dir: Path, pandas_dir: Path) -> bool:
    """Whether both jobs wrote equal sequences and id maps (list and index dtypes aligned to the contract)."""
    for name in ("sequences", "user_map", "item_map"):
        ours = pl.read_parquet(polars_dir / FEATURE_FILES[name])
        theirs = pl.read_parquet(pandas_dir / FEATURE_FILES[name]).cast(ours.schema)  # type: ignore[arg-type]
        if not ours.equals(theirs):
            return False
    return True


# ---------------------------------------------------------------------------------------------- measuring


def measure(args: list[str]) -> dict[str, float]:
    """Run ``python -m benchmarks.features_scale ARGS`` in a child; wall s, its peak RSS GB, load before/after."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.features_scale", *args], cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"job {args} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_gb": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def machine() -> str:
    model = platform.processor() or "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return f"CPU {model}, {len(os.sched_getaffinity(0))} cores, {mem_kib / 2**20:.0f} GiB RAM, polars {pl.__version__}"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def append_rows(path: Path, rows: list[str]) -> None:
    """Insert ``rows`` at the end of this benchmark's table in ``path`` (the section is created if missing)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        intro = textwrap.fill(_INTRO, width=110, break_on_hyphens=False)
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{intro}\n\n{_TABLE_HEADER}\n"
    lines = text.split("\n")
    at = lines.index(SECTION) + 1
    while not lines[at].startswith("|"):
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    path.write_text("\n".join([*lines[:at], *rows, *lines[at:]]))


_INTRO = (
    "Synthetic events from `benchmarks/features_scale.py` (seeded; Zipf item popularity, Pareto-tailed user "
    "activity, per-user increasing timestamps with ties, 1% exact duplicates, one parquet file in rough time "
    "order). Job: validate → exact dedup → id maps → per-user sequences → leave-one-out split → parquet "
    "(events with split, sequences, id maps, manifest). `polars` is the library's own "
    "`features.build.build_features`; `pandas` a plain pandas implementation of the same job inside the "
    "script (single-threaded, as pandas is), checked to give equal sequences and id maps. Each job runs in "
    "its own process; wall time, CPU time (user + system) and peak RSS (`ru_maxrss`) are of that process "
    "alone, data generation excluded. With `features.partitions` = P > 1 the build runs out of core: "
    "streaming passes (Polars streaming engine) split the events into P user ranges and join the parts; each range is sorted, "
    "deduplicated and split in memory. The load column is `/proc/loadavg` (1 min) before and after the "
    "job: above ~0.5 the 2-core machine was shared with other jobs."
)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, required=True, help="rows to generate, duplicates included")
    parser.add_argument("--partitions", type=int, default=1, help="features.partitions of the polars job")
    parser.add_argument("--compare-pandas", action="store_true", help="also run the pandas job and compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "work" / "features_scale")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md", help="file to append to")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also append the run's record (arguments, measurements, machine, commit) as a JSON line")
    parser.add_argument("--job", choices=["polars", "pandas"], help=argparse.SUPPRESS)  # child mode
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides of the polars job (e.g. features.min_item_events=5); not with "
                             "--compare-pandas, whose job knows no policies")
    args = parser.parse_args(argv)
    if args.overrides and args.compare_pandas:
        parser.error("KEY=VALUE overrides change the polars job only: not with --compare-pandas")
    if args.json_out is not None:  # before the measuring, not after; imported here: benchmarks.machine imports
        from benchmarks.machine import check_json_out  # torch, which the child jobs' RSS must not count

        check_json_out(args.json_out)
    if args.job == "polars":
        run_polars(_source(args), args.work_dir / "polars", args.partitions, args.overrides)
    elif args.job == "pandas":
        run_pandas(_source(args), args.work_dir / "pandas")
    else:
        run_benchmark(args, "python -m benchmarks.features_scale " + " ".join(argv or sys.argv[1:]))


def _source(args: argparse.Namespace) -> Path:
    return args.work_dir / f"events-{args.events}-seed{args.seed}.parquet"


def run_benchmark(args: argparse.Namespace, command: str) -> None:
    """Generate the data, measure each job in a child process, compare, append to BENCHMARKS.md, clean up."""
    print(f"generating {args.events:,} events into {_source(args)}", flush=True)
    start = time.perf_counter()
    generated = generate_skewed_events(args.events, _source(args), args.seed)
    print(f"generated in {time.perf_counter() - start:.0f} s: {generated}", flush=True)
    shared = ["--events", str(args.events), "--seed", str(args.seed), "--work-dir", str(args.work_dir)]
    results = {"polars": measure([*shared, "--partitions", str(args.partitions), "--job", "polars", *args.overrides])}
    if args.compare_pandas:
        results["pandas"] = measure([*shared, "--job", "pandas"])
        if not same_sequences(args.work_dir / "polars" / "features", args.work_dir / "pandas"):
            raise RuntimeError(f"the pandas and polars jobs disagree; see the outputs under {args.work_dir}")
    rows = report_rows(args, results, command)
    # here, not at the top: the child jobs import this module, and benchmarks.machine imports torch (its RSS)
    from benchmarks.machine import emit, jsonable

    emit(jsonable({"bench": "features_scale", "command": command, "args": vars(args), "results": results}),
         args.json_out, [])
    append_rows(args.benchmarks, rows)
    print("\n".join(rows))
    if not args.keep:
        shutil.rmtree(args.work_dir)


def report_rows(args: argparse.Namespace, results: dict[str, dict[str, float]], command: str) -> list[str]:
    """One BENCHMARKS.md row per job."""
    manifest = json.loads((args.work_dir / "polars" / "features" / FEATURE_FILES["manifest"]).read_text())
    ratio = ""
    if "pandas" in results:
        ratio = f"{results['pandas']['wall_s'] / results['polars']['wall_s']:.1f}×"
    rows = []
    for job, result in results.items():
        threads = f"polars, {pl.thread_pool_size()} threads" if job == "polars" else "pandas"
        parts = args.partitions if job == "polars" else "—"
        rows.append(
            f"| {dt.date.today().isoformat()} | {args.events:,} | {manifest['n_users']:,} | "
            f"{manifest['n_items']:,} | {threads} | {parts} | {result['wall_s']:.1f} | {result['cpu_s']:.0f} | {result['rss_gb']:.2f} | "
            f"{ratio if job == 'polars' else ''} | {result['load_before']:.1f} → {result['load_after']:.1f} | "
            f"{machine()} | `{command}` | {commit()} |"
        )
    return rows


if __name__ == "__main__":
    main()
