"""Unattended nights on real events: `recsys run --config conf/benchmarks/nightly-taobao.yaml` once per day.

    python -m benchmarks.nightly [--data-root ../shared/data] [--first 2017-11-26] [--work work/nightly]
        [--json-out F] [--no-table] [KEY=VALUE ...]

The Taobao UserBehavior head sample (``taobao-userbehavior-sample/``: 814 users, 84,287 events of 4 types over
9 days) is written as daily Parquet partitions (``events/date=YYYY-MM-DD/part-0.parquet``) one day at a time,
as an export would deliver them; after each day arrives, the whole pipeline runs for that date with the
production config (``conf/prod.yaml``: input gate, bot filter, warm start from the champion with shrink and
perturb, history segments, champion re-scored on the same users by the promotion gate, candidates from the
registry for the active users, retention). The first night trains from scratch
(``train.init_from=null candidates.model=null``). Each record: the night's wall time, rows, users, items,
training epochs and seconds, val and test NDCG@10 of the model and popularity, the gate's decision with both
re-scored numbers, and the candidate rows. Appends the rows to BENCHMARKS.md unless ``--no-table``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from benchmarks.machine import append_row, emit
from pipelines.cli import EXIT_OK
from pipelines.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "benchmarks" / "nightly-taobao.yaml"
SAMPLE = Path("taobao-userbehavior-sample") / "UserBehavior_head_814users.csv"
TITLE = "Nightly runs on real events (Taobao sample, conf/prod.yaml)"
INTRO = """`python -m benchmarks.nightly` (`conf/benchmarks/nightly-taobao.yaml` = `conf/prod.yaml` with max
length 50, items with 2 events or more, 90 s of training per night): the Taobao UserBehavior head sample (814 users, 84,287 events of
4 types) delivered as one Parquet partition per day; after each day `recsys run --run-date <day>` runs the
whole production pipeline unattended. Night 1 trains from scratch, later nights warm start from the champion
(shrink/perturb 0.5/0.5) and the gate re-scores the champion on the same validation users. 55k items for
84k events: a sparse catalogue, low absolute NDCG; the point is the nightly loop, its gates and its times."""
HEADER = ("| night | events | users | items | run s | train s (epochs) | val NDCG@10 | test NDCG@10 model / "
          "popularity | gate: challenger vs champion re-scored (paired Δ) | promoted | candidate rows | "
          "machine | date | commit |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _events(path: Path) -> pl.DataFrame:
    raw = pl.read_csv(path, has_header=False,
                      new_columns=["user_id", "item_id", "category_id", "event_type", "timestamp"])
    return raw.select("user_id", "item_id", "event_type", "timestamp").with_columns(
        pl.from_epoch("timestamp").dt.date().alias("day"))


def _night(work: Path, day: dt.date, first: bool, overrides: list[str]) -> dict:
    extra = ["train.init_from=null", "candidates.model=null"] if first else []
    began = time.perf_counter()
    code = cli(["run", "--quiet", "--config", str(CONFIG), "--run-date", day.isoformat(), f"work_dir={work}",
                f"data.path={work / 'events'}", *extra, *overrides])
    run_s = time.perf_counter() - began
    if code != EXIT_OK:
        raise SystemExit(f"the night of {day} failed with exit code {code}; logs in {work / 'logs'}")
    features = json.loads((work / "features" / "manifest.json").read_text())
    train = json.loads((work / "model" / "train_report.json").read_text())
    report = json.loads((work / "evaluation" / "report.json").read_text())
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    manifest = json.loads((work / "candidates" / f"date={day}" / "manifest.json").read_text())
    return {"night": day.isoformat(), "run_s": run_s, "rows_in": features["rows_in"],
            "n_users": features["n_users"], "n_items": features["n_items"], "train_s": train["wall_time_s"],
            "epochs_run": train["epochs_run"], "best_val_ndcg_at_10": train["best_val_ndcg_at_10"],
            "warm_start": train["warm_start"], "test_ndcg_at_10": report["model"]["ndcg_at_10"],
            "popularity_ndcg_at_10": report["popularity"]["ndcg_at_10"],
            "promoted": promotion["promoted"], "basis": promotion["basis"], "comparison": promotion["comparison"],
            "version": promotion["version"], "candidate_rows": manifest["rows"], "candidate_users": manifest["users"]}


def taobao_args(doc: str, work: str, argv: list[str] | None,
                extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[argparse.Namespace, Path]:
    """The arguments of a benchmark on the Taobao sample (``--data-root``, ``--work`` defaulting to
    ``work/<work>``, ``--json-out``, ``--no-table``, KEY=VALUE overrides, and what ``extra`` adds) and the
    sample's path; stops naming ``--data-root`` when the sample is not there."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "work" / work)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--no-table", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    source = a.data_root / SAMPLE
    if not source.is_file():
        raise SystemExit(f"{source} does not exist; pass --data-root (the folder holding {SAMPLE.parent}/)")
    return a, source


def main(argv: list[str] | None = None) -> list[dict]:
    def first(p: argparse.ArgumentParser) -> None:
        p.add_argument("--first", type=dt.date.fromisoformat, default=dt.date(2017, 11, 26),
                       help="the first night (its partition and every earlier one are there before it runs)")

    a, source = taobao_args(__doc__, "nightly", argv, first)
    events = _events(source)
    shutil.rmtree(a.work, ignore_errors=True)
    records = []
    days = sorted(events["day"].unique().to_list())
    for day in days:
        part = a.work / "events" / f"date={day}"
        part.mkdir(parents=True)
        events.filter(pl.col("day") == day).drop("day").write_parquet(part / "part-0.parquet")
        if day < a.first:
            continue
        emit({"bench": "nightly", **_night(a.work, day, not records, a.overrides), "overrides": a.overrides},
             a.json_out, records)
    if not a.no_table:
        _table(records)
    return records


def _table(records: list[dict]) -> None:
    for r in records:
        c = r["comparison"]
        gate = ("first model" if c is None and r["version"] == "1" else "—" if c is None else
                f"{c['challenger_ndcg']:.4f} vs {c['champion_ndcg']:.4f} ({c['delta']:+.4f} ± "
                f"{1.96 * (c['delta_se'] or 0):.4f}, {c['users_compared']} users)")
        row = (f"| {r['night']} | {r['rows_in']} | {r['n_users']} | {r['n_items']} | {r['run_s']:.1f} | "
               f"{r['train_s']:.1f} ({r['epochs_run']}) | {r['best_val_ndcg_at_10']:.4f} | "
               f"{r['test_ndcg_at_10']:.4f} / {r['popularity_ndcg_at_10']:.4f} | {gate} | "
               f"{'v' + r['version'] if r['promoted'] else 'no (v' + r['version'] + ')'} | {r['candidate_rows']} | "
               f"{r['machine']} | {r['date']} | {r['commit']} |")
        append_row(ROOT / "BENCHMARKS.md", TITLE, INTRO, HEADER, row)


if __name__ == "__main__":
    main()
