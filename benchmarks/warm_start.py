"""Nightly retraining with and without a warm start (``train.init_from``), on real timestamped events.

    python -m benchmarks.warm_start [--data-root ../shared/data] [--new-share 0.05] [--seeds 42,43,44]
        [--work work/warm-start] [--json-out F] [--resume] [--no-table] [KEY=VALUE ...]

MovieLens latest-small (``ml-latest-small/ratings.csv``, timestamps in seconds) is cut in time: "yesterday"
holds every rating before the newest ``--new-share`` of them, "today" holds all. The pipeline's own jobs
(``recsys features`` then ``recsys train`` then ``recsys evaluate``, leave-one-out, full catalogue) train
yesterday's model once from scratch (seed 42), then today's model per seed twice: from scratch, and warm
started from yesterday's model. Each record has the epochs run, the best epoch, the training wall time, the
best validation NDCG@10 and the test NDCG@10 / HR@10 with their standard errors over users. The config is
``conf/benchmarks/warm-start.yaml`` plus the overrides; both of today's lines use the same settings
(early stopping with the same patience), so the difference is the starting point only. Appends the rows to
BENCHMARKS.md unless ``--no-table``. ``--resume`` (needs ``--json-out``) keeps the records already in that file
and yesterday's model under ``--work``, and runs only the missing (start, seed) pairs; the table is written from
all records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import polars as pl

from benchmarks.machine import append_row, emit
from pipelines.cli import EXIT_OK
from pipelines.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "benchmarks" / "warm-start.yaml"
TITLE = "Warm start: nightly retraining from yesterday's model"
INTRO = """MovieLens latest-small cut in time: yesterday = all ratings but the newest 5 %, today = all
(`python -m benchmarks.warm_start`, `conf/benchmarks/warm-start.yaml`: d 64, 2 blocks, max length 200, full
softmax, patience 10). Today's model trained from scratch against warm started from yesterday's
(`train.init_from`; with shrink and perturb where the row names `train.init_shrink` / `init_perturb`), same
settings otherwise: one row per run, then the line's mean ± std; test NDCG@10 with its standard error over
users. Every number is chosen on validation (best epoch); the test columns are for reading only. The load column is the machine's 1-minute load average when the run ended: above 2 on
these 2 cores, other work shared them and the seconds of that row are inflated."""
HEADER = ("| start | seed | epochs run | best epoch | training s | s to best epoch | val NDCG@10 after epoch 1 "
          "| best val NDCG@10 | test NDCG@10 (s.e.) | test HR@10 | 1-min load at the end | machine | date | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _cut(ratings: Path, out: Path, new_share: float) -> dict:
    """Write yesterday's and today's CSV inputs under ``out``; return their sizes and the cut timestamp."""
    events = pl.read_csv(ratings)
    cut = int(events["timestamp"].quantile(1.0 - new_share, "lower"))
    out.mkdir(parents=True, exist_ok=True)
    events.filter(pl.col("timestamp") <= cut).write_csv(out / "yesterday.csv")
    events.write_csv(out / "today.csv")
    return {"cut_timestamp": cut, "events_yesterday": int((events["timestamp"] <= cut).sum()),
            "events_today": events.height}


def _job(*args: str) -> None:
    code = cli([args[0], "--quiet", "--config", str(CONFIG), *args[1:]])
    if code != EXIT_OK:
        raise SystemExit(f"recsys {args[0]} failed with exit code {code}: {' '.join(args)}")


def _train_and_evaluate(work: Path, features: Path, seed: int, extra: list[str]) -> dict:
    """Copy ``features`` into ``work``, train and evaluate there; the train and test numbers."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(features, work / "features")
    common = [f"work_dir={work}", f"train.seed={seed}", *extra]
    _job("train", *common)
    _job("evaluate", *common)
    return _numbers(work)


def _numbers(work: Path) -> dict:
    """The train and test numbers of a trained and evaluated work directory."""
    train = json.loads((work / "model" / "train_report.json").read_text())
    test = json.loads((work / "evaluation" / "report.json").read_text())["model"]
    history = train["history"]
    return {"epochs_run": train["epochs_run"], "best_epoch": train["best_epoch"],
            "train_s": train["wall_time_s"], "best_val_ndcg_at_10": train["best_val_ndcg_at_10"],
            # val NDCG@10 after the first epoch, and the training seconds until the best epoch ended
            "first_val_ndcg_at_10": history[0]["val_ndcg_at_10"],
            "best_fit_s": next(h["fit_s"] for h in history if h["epoch"] == train["best_epoch"]),
            "test_ndcg_at_10": test["ndcg_at_10"], "test_ndcg_at_10_se": test["ndcg_at_10_se"],
            "test_hr_at_10": test["hr_at_10"], "warm_start": train["warm_start"]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--new-share", type=float, default=0.05, help="share of the newest ratings that is new today")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--starts", default="scratch,warm", help="which of today's lines to run")
    p.add_argument("--warm", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the warm line only (repeatable), e.g. train.init_shrink=0.5")
    p.add_argument("--work", type=Path, default=ROOT / "work" / "warm-start")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--resume", action="store_true",
                   help="keep the records in --json-out and yesterday's model; run only what is missing")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.resume and a.json_out is None:
        raise SystemExit("--resume needs --json-out (the file holding the records to keep)")
    ratings = a.data_root / "ml-latest-small" / "ratings.csv"
    if not ratings.is_file():
        raise SystemExit(f"{ratings} does not exist; pass --data-root (the folder holding ml-latest-small/)")
    cut = _cut(ratings, a.work / "input", a.new_share)
    features = {}
    for day in ("yesterday", "today"):
        _job("features", f"work_dir={a.work / day}", f"data.path={a.work / 'input' / f'{day}.csv'}",
             *a.overrides)
        features[day] = a.work / day / "features"
    kept = _kept(a.json_out, cut, a.overrides) if a.resume else []
    report = a.work / "yesterday-model" / "model" / "train_report.json"
    starts = a.starts.split(",")
    if a.resume and kept and report.is_file():
        yesterday = json.loads(report.read_text())
    elif "warm" not in starts:  # only from-scratch lines: yesterday's model is not needed
        yesterday = {"epochs_run": None, "best_val_ndcg_at_10": None}
    else:
        yesterday = _train_and_evaluate(a.work / "yesterday-model", features["yesterday"], 42, a.overrides)
    init = f"train.init_from={a.work / 'yesterday-model' / 'model'}"
    records = list(kept)
    done = {_line(r) + (r["seed"],) for r in kept}
    for start in starts:
        warm = a.warm if start == "warm" else []
        for seed in (int(s) for s in a.seeds.split(",")):
            if (start, *warm, seed) in done:
                continue
            began = time.perf_counter()
            extra = [*a.overrides, *([init, *warm] if start == "warm" else [])]
            name = "-".join([start, *(_leaf(w) for w in warm), str(seed)])
            result = _train_and_evaluate(a.work / f"today-{name}", features["today"], seed, extra)
            emit({"bench": "warm_start", "start": start, "warm_overrides": warm, "seed": seed, **result, **cut,
                  "yesterday": {k: yesterday[k] for k in ("epochs_run", "best_val_ndcg_at_10")},
                  "job_s": time.perf_counter() - began, "overrides": a.overrides}, a.json_out, records)
    if not a.no_table:
        _table(records)
    return records


def _leaf(override: str) -> str:
    """``train.init_shrink=0.5`` → ``init_shrink0.5`` (a directory name part)."""
    key, _, value = override.partition("=")
    return key.rpartition(".")[2] + value


def _line(record: dict) -> tuple[str, ...]:
    """Which of today's lines a record belongs to: its start and the warm line's own overrides."""
    return (record["start"], *record.get("warm_overrides", []))


def _kept(path: Path, cut: dict, overrides: list[str]) -> list[dict]:
    """The records of ``path`` made from the same cut and overrides (the others belong to another run)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("bench") == "warm_start" and r["overrides"] == overrides
            and all(r[k] == v for k, v in cut.items())]


def _table(records: list[dict]) -> None:
    """One row per run (a seed can fall into another mode, e.g. stop on the popularity plateau), then one row
    of mean ± std per line."""
    lines = list(dict.fromkeys(_line(r) for r in records))
    for line in lines:
        rows = [r for r in records if _line(r) == line]
        label = "from scratch" if line[0] == "scratch" else " ".join(["warm (yesterday)", *line[1:]])
        for r in rows:
            _append(label, str(r["seed"]), [r])
        if len(rows) > 1:
            _append(f"**{label}, mean ± std**", ",".join(str(r["seed"]) for r in rows), rows)


def _ms(values: list[float], fmt: str) -> str:
    """Mean ± sample standard deviation; one value as is."""
    if len(values) == 1:
        return str(values[0]) if isinstance(values[0], int) else format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _append(label: str, seeds: str, rows: list[dict]) -> None:
    se = statistics.mean(r["test_ndcg_at_10_se"] for r in rows)
    cells = [label, seeds,
             _ms([r["epochs_run"] for r in rows], ".1f"), _ms([r["best_epoch"] for r in rows], ".1f"),
             _ms([r["train_s"] for r in rows], ".1f"), _ms([r["best_fit_s"] for r in rows], ".1f"),
             _ms([r["first_val_ndcg_at_10"] for r in rows], ".4f"),
             _ms([r["best_val_ndcg_at_10"] for r in rows], ".4f"),
             f"{_ms([r['test_ndcg_at_10'] for r in rows], '.4f')} ({se:.4f})",
             _ms([r["test_hr_at_10"] for r in rows], ".4f"), _ms([r["load_1min"] for r in rows], ".2f"),
             rows[0]["machine"], rows[0]["date"], rows[0]["commit"]]
    append_row(ROOT / "BENCHMARKS.md", TITLE, INTRO, HEADER, "| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
