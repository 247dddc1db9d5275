"""Repeat consumption and the evaluation protocol: the model and the baselines with the user's seen items
excluded from the ranking (the standard protocol) and competing (``evaluate.exclude_seen=false``).

    python -m benchmarks.repeat_protocol [--data-root ../shared/data] [--json-out F] [--no-table]
        [--protocols excluded,competing] [--category] [KEY=VALUE ...]
    python -m benchmarks.repeat_protocol --from-json F [F ...]     # only the table rows of earlier records

The Taobao UserBehavior head sample (all its days in one file), ``conf/benchmarks/nightly-taobao.yaml`` with
the nightly gates off (``features.max_event_age`` / ``min_rows_ratio``: the data is from 2017), no warm start,
no tracking. Features are built once; then for each protocol the model is trained (the protocol also picks
its best epoch) and evaluated with the baselines popularity, item-kNN and repeat (the user's own items,
most recent first, then popularity). One record per protocol: NDCG@10 and HR@10 of every scorer, the
share of test targets the user had seen before, train seconds and epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl

from benchmarks.machine import append_row, emit, read_records
from benchmarks.nightly import CONFIG, ROOT, taobao_args
from pipelines.cli import EXIT_OK
from pipelines.cli import main as cli

SCORERS = ("model", "popularity", "item_knn", "repeat")
COMMON = ["train.init_from=null", "candidates.model=null", "tracking.enabled=false", "features.max_event_age=null",
          "features.min_rows_ratio=null", "evaluate.history_segments=[]"]
# repeat only where seen items compete: with them excluded it would put a re-consumed target first by construction
# (the config refuses it; the 2026-11-23 "excluded" rows below still carry that leaked figure).
BASELINES = {True: "evaluate.baselines=[popularity,item_knn]", False: "evaluate.baselines=[popularity,item_knn,repeat]"}
TITLE = "Repeat consumption: seen items excluded or competing (Taobao sample)"
INTRO = """`python -m benchmarks.repeat_protocol`: the Taobao UserBehavior head sample (814 users, 84,287 events
of 4 types over 9 days, every day in one file), `conf/benchmarks/nightly-taobao.yaml` (max length 50, items with
2 events or more, 90 s of training) from scratch, test = each user's last event. **excluded**: the standard
protocol, the user's earlier items are dropped from the ranking (the target never is). **competing**:
`evaluate.exclude_seen=false`, which also picks the best epoch on that protocol. `repeat` = the user's own items,
most recent first, then popularity. "seen targets": test targets the user had consumed before."""
HEADER = ("| protocol | overrides | seen targets | NDCG@10 model / popularity / item-kNN / repeat | HR@10 model / "
          "popularity / item-kNN / repeat | model − repeat NDCG@10 (± 95 %) | train s (epochs, best) | val NDCG@10 | "
          "load | machine | date | commit |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _seen_share(work: Path) -> float:
    """Share of users whose test target is in their train + validation history."""
    seq = pl.read_parquet(work / "features" / "sequences.parquet").filter(pl.col("test_items").list.len() > 0)
    seen = seq.select(pl.col("test_items").list.first().is_in(pl.concat_list("train_items", "val_items"))
                      .alias("seen"))["seen"]
    return float(seen.mean())


def _protocol(work: Path, exclude_seen: bool, overrides: list[str]) -> dict:
    base = ["--quiet", "--config", str(CONFIG), f"work_dir={work}", *COMMON,
            f"evaluate.exclude_seen={str(exclude_seen).lower()}", BASELINES[exclude_seen], *overrides]
    for job in ("train", "evaluate"):
        if cli([job, *base]) != EXIT_OK:
            raise SystemExit(f"recsys {job} failed; logs in {work / 'logs'}")
    train = json.loads((work / "model" / "train_report.json").read_text())
    report = json.loads((work / "evaluation" / "report.json").read_text())
    return {"protocol": "excluded" if exclude_seen else "competing", "exclude_seen": exclude_seen,
            "seen_target_share": _seen_share(work), "n_users": report["model"]["n_users"],
            **{f"{s}_{m}": report[s][f"{m}_at_10"] for s in SCORERS if s in report for m in ("ndcg", "hr")},
            **({"delta_repeat_ndcg": report["repeat"]["delta_ndcg_at_10"],
                "delta_repeat_ndcg_se": report["repeat"]["delta_ndcg_at_10_se"]} if "repeat" in report else {}),
            "train_s": train["wall_time_s"], "epochs_run": train["epochs_run"], "best_epoch": train["best_epoch"],
            "best_val_ndcg_at_10": train["best_val_ndcg_at_10"]}


def main(argv: list[str] | None = None) -> list[dict]:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--from-json"]:
        table(read_records([Path(f) for f in argv[1:]]))
        return []
    def protocols(p: argparse.ArgumentParser) -> None:
        p.add_argument("--protocols", default="excluded,competing",
                       help="which protocols to run, comma-separated (excluded, competing)")
        p.add_argument("--category", action="store_true",
                       help="give the model each item's category as an attribute (data.item_features)")

    a, source = taobao_args(__doc__, "repeat-protocol", argv, protocols)
    chosen = [name.strip() for name in a.protocols.split(",")]
    if not chosen or set(chosen) - {"excluded", "competing"}:
        raise SystemExit(f"--protocols {a.protocols!r}: name excluded and/or competing")
    a.work.mkdir(parents=True, exist_ok=True)
    events = a.work / "events.parquet"
    raw = pl.read_csv(source, has_header=False, new_columns=["user_id", "item_id", "category_id", "event_type",
                                                            "timestamp"])
    raw.drop("category_id").write_parquet(events)
    if a.category:  # one row per event: the feature job merges an item's rows (counted as duplicate_item_rows)
        raw.select("item_id", "category_id").write_parquet(a.work / "items.parquet")
        a.overrides += [f"data.item_features.path={a.work / 'items.parquet'}", "data.item_features.columns=[category_id]"]
    began = time.perf_counter()
    if cli(["features", "--quiet", "--config", str(CONFIG), f"work_dir={a.work}", f"data.path={events}",
            *COMMON, *a.overrides]) != EXIT_OK:
        raise SystemExit(f"recsys features failed; logs in {a.work / 'logs'}")
    features_s = time.perf_counter() - began
    records: list[dict] = []
    for exclude_seen in [name == "excluded" for name in chosen]:
        emit({"bench": "repeat_protocol", **_protocol(a.work, exclude_seen, a.overrides), "features_s": features_s,
              "overrides": a.overrides}, a.json_out, records)
    if not a.no_table:
        table(records)
    return records


def table(records: list[dict]) -> None:
    """Append one BENCHMARKS.md row per record (also for records read back from a --json-out file)."""
    for r in records:
        scores = " / ".join(f"{r[f'{s}_ndcg']:.4f}" if f"{s}_ndcg" in r else "—" for s in SCORERS)
        hits = " / ".join(f"{r[f'{s}_hr']:.4f}" if f"{s}_hr" in r else "—" for s in SCORERS)
        delta = (f"{r['delta_repeat_ndcg']:+.4f} ± {1.96 * r['delta_repeat_ndcg_se']:.4f}"
                 if "delta_repeat_ndcg" in r else "—")
        row = (f"| {r['protocol']} | {' '.join(r['overrides']) or '—'} | {r['seen_target_share']:.1%} of "
               f"{int(r['n_users'])} | {scores} | {hits} | {delta} | {r['train_s']:.1f} ({r['epochs_run']}, "
               f"{r['best_epoch']}) | {r['best_val_ndcg_at_10']:.4f} | {r['load_1min']:.2f} | {r['machine']} | "
               f"{r['date']} | {r['commit']} |")
        append_row(ROOT / "BENCHMARKS.md", TITLE, INTRO, HEADER, row)


if __name__ == "__main__":
    main()
