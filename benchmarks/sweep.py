"""Run a list of benchmark configurations in parallel processes (one machine, e.g. one GPU shared by all).

    python -m benchmarks.sweep benchmarks/sweeps/<name>.txt --parallel 8 --json-out results.jsonl \\
        [--seeds 42] [--log-dir logs/] [--data-root ../shared/data] [--set KEY=VALUE ...]

Each non-comment line of the sweep file is ``<tag> <dataset> [KEY=VALUE ...]``; it runs
``python -m benchmarks.sequential --dataset <dataset> --tag <tag> --seeds ... --no-table`` with the line's
overrides after the common ones, so every finished seed lands in ``--json-out`` as a JSON line (see
benchmarks/sequential.py). Configurations are compared on validation NDCG@10 only; ``--rank`` prints them
ranked by it from a results file, and ``--best RESULTS`` prints the lines of the sweep file whose tags have the
highest mean validation NDCG@10 in RESULTS, ``--top`` per dataset (a sweep file for the seeds of the chosen ones):

    python -m benchmarks.sweep benchmarks/sweeps/round3.txt --best round3.jsonl --top 1 > chosen.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.machine import read_records

ROOT = Path(__file__).resolve().parent.parent


def read_sweep(path: Path) -> list[tuple[str, str, list[str]]]:
    """(tag, dataset, overrides) per line; raises ``SystemExit`` naming the line on a malformed one."""
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tag, *rest = line.split()
        if not rest or "=" in rest[0] or any("=" not in x for x in rest[1:]):
            raise SystemExit(f"{path}:{n}: expected '<tag> <dataset> [KEY=VALUE ...]', got {line!r}")
        runs.append((tag, rest[0], rest[1:]))
    tags = [t for t, _, _ in runs]
    if len(set(tags)) != len(tags):
        raise SystemExit(f"{path}: tags must be unique, got {tags}")
    return runs


def rank(paths: list[Path]) -> str:
    """Configurations (tag and overrides) ranked by mean validation NDCG@10; test numbers alongside only for
    configurations whose every record has them (the chosen ones, scored after the choice)."""
    by_config: dict[tuple, list[dict]] = defaultdict(list)
    for record in read_records(paths):
        by_config[(record["tag"], tuple(record["overrides"]))].append(record)
    rows = []
    for (tag, overrides), records in by_config.items():
        seeds = [r["seed"] for r in records]
        if len(set(seeds)) < len(seeds):
            raise SystemExit(f"{tag}: seeds {seeds}: a seed comes twice in {[str(p) for p in paths]}")
        val = statistics.mean(r["train"]["best_val_ndcg_at_10"] for r in records)
        test = ""
        if all(r["results"] for r in records):
            ndcg = statistics.mean(r["results"]["model"]["ndcg_at_10"] for r in records)
            hr = statistics.mean(r["results"]["model"]["hr_at_10"] for r in records)
            test = f"test {ndcg:.4f} / {hr:.4f}  "
        epochs = "/".join(f"{r['train']['best_epoch']}({r['train']['epochs_run']})" for r in records)
        rows.append((records[0]["dataset"], -val, f"{records[0]['dataset']:16s} {tag:24s} val {val:.4f}  "
                     f"{test}n={len(records)} epochs {epochs}  {' '.join(overrides)}"))
    return "\n".join(text for *_, text in sorted(rows))


def best_lines(sweep: Path, results: Path, top: int) -> list[str]:
    """The lines of ``sweep`` whose tags rank in the ``top`` of their dataset by mean validation NDCG@10 over
    the seeds that every such line of the dataset finished (a line with one lucky surviving seed used to beat
    lines whose three seeds averaged lower).

    Tags of the sweep file without a record in ``results`` (failed runs) are left out; raises ``SystemExit``
    if no tag of the file has one, if a (tag, seed) comes twice (a rerun appended to the same file: keep one),
    or if the lines of a dataset share no finished seed.
    """
    val: dict[str, dict[Any, float]] = defaultdict(dict)
    for record in read_records([results]):
        tag, seed = record["tag"], record.get("seed")
        if seed in val[tag]:
            raise SystemExit(f"{results}: {tag} seed {seed} comes twice; keep one record per (tag, seed)")
        val[tag][seed] = record["train"]["best_val_ndcg_at_10"]
    lines: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for tag, dataset, overrides in read_sweep(sweep):
        if val[tag]:
            lines[dataset].append((tag, f"{tag} {dataset} {' '.join(overrides)}".strip()))
    if not lines:
        raise SystemExit(f"{results}: no record of any tag of {sweep}")
    by_dataset: dict[str, list[tuple[float, str]]] = {}
    for dataset, tags in lines.items():
        common = set.intersection(*(set(val[tag]) for tag, _ in tags))
        if not common:
            raise SystemExit(f"{results}: the lines of {dataset} share no finished seed "
                             f"({ {tag: sorted(val[tag], key=str) for tag, _ in tags} }); rerun the missing seeds")
        by_dataset[dataset] = [(statistics.mean(val[tag][s] for s in common), line) for tag, line in tags]
    return [line for runs in by_dataset.values() for _, line in sorted(runs, key=lambda r: -r[0])[:top]]


def command(tag: str, dataset: str, overrides: list[str], seed: str, args: argparse.Namespace) -> list[str]:
    """The benchmarks.sequential command of one (line, seed): validation only unless ``args.test``."""
    return [sys.executable, "-m", "benchmarks.sequential", "--dataset", dataset, "--tag", tag,
            "--seeds", seed, "--json-out", str(args.json_out.resolve()), "--no-table",
            "--data-root", str(args.data_root.resolve()), "--work-root", str(args.work_root.resolve()),
            *([] if args.test else ["--no-test"]), *(["--resume"] if args.resume else []),
            *args.common, *overrides]


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, nargs="?")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--log-dir", type=Path, default=ROOT / "work" / "sweep-logs")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-root", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--rank", type=Path, nargs="+", help="only rank the records of these results files")
    parser.add_argument("--best", type=Path, metavar="RESULTS",
                        help="print the sweep file's lines with the best validation NDCG@10 in RESULTS")
    parser.add_argument("--top", type=int, default=1, help="with --best: lines per dataset")
    parser.add_argument("--test", action="store_true",
                        help="also score the test split (for the chosen lines; by default candidates are scored on "
                             "validation only, as PROTOCOL.md scores the test target once, for the chosen model)")
    parser.add_argument("--resume", action="store_true",
                        help="resume today's runs of the lines (a finished one resumes as finished): with --test, "
                             "the test score of candidates a validation-only sweep trained")
    parser.add_argument("--set", dest="common", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every run (before each line's own)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser()
    args = parser.parse_args(argv)
    if args.rank:
        print(rank(args.rank))
        return
    if args.best:
        if args.sweep is None:
            parser.error("--best needs the sweep file whose lines it picks")
        print("\n".join(best_lines(args.sweep, args.best, args.top)))
        return
    if args.sweep is None or args.json_out is None:
        parser.error("a sweep file and --json-out are required unless --rank is given")
    # One process per (line, seed), so that the seeds of a configuration run side by side too.
    runs = [(tag, dataset, overrides, seed) for tag, dataset, overrides in read_sweep(args.sweep)
            for seed in args.seeds.split(",")]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < args.parallel:
            tag, dataset, overrides, seed = pending.pop(0)
            cmd = command(tag, dataset, overrides, seed, args)
            log = (args.log_dir / f"{tag}-seed{seed}.log").open("w")
            active.append((f"{tag} seed {seed}", subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}), log))
            print(f"started {tag} seed {seed}", flush=True)
        time.sleep(2)
        for item in list(active):
            tag, proc, log = item
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                print(f"finished {tag}: exit {proc.returncode}", flush=True)
    print(rank([args.json_out]) if args.json_out.is_file() else "no results")


if __name__ == "__main__":
    main()
