"""Sequential-recommendation benchmark under ../shared/PROTOCOL.md; writes a markdown table to BENCHMARKS.md.

    python -m benchmarks.sequential --dataset ml-1m [--seeds 42,43,44] [--config conf/benchmarks/ml-1m.yaml]
                                    [--data-root ../shared/data] [KEY=VALUE ...]
    python -m benchmarks.sequential --from-json results.jsonl [...]   # table from runs made elsewhere (a GPU)

Runs the pipeline's own jobs (features → train → evaluate on the test split, baselines in the same
evaluation run) once per seed and records test NDCG@10 / HR@10 (mean ± std over seeds), the best validation
NDCG@10 the model was chosen by, the baselines, the published anchors, epochs, wall time, hardware and commit.
Each finished seed is also appended as one JSON line to ``--json-out`` at once, so an interrupted run keeps
the seeds it finished. The test split is scored once per seed, for the best-validation checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import append_record, commit, load_1min, machine, read_records
from pipelines import build_features, evaluate, train
from pipelines.schedule import training_hash
from pipelines.workdir import WorkDir
from recsys.config import Config, load_config, without_budget

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    "ml-1m": "ml-1m/ml-1m.txt",
    "beauty-s3rec": "amazon-beauty-s3rec/Beauty.txt",
    "beauty-bert4rec": "amazon-beauty-bert4rec/beauty.txt",
}
# Best published NDCG@10 / HR@10 under the same protocol (../shared/PROTOCOL.md) and the targets.
ANCHORS = {
    "ml-1m": ("LRURec 0.1930 / 0.3264; SASRec full CE 0.1902 / 0.3181", "≥ 0.200 / ≥ 0.335"),
    "beauty-s3rec": ("SASRec + sampled softmax 0.0531 / 0.0921; eSASRec 0.0523 / 0.0928", "≥ 0.056 / ≥ 0.096"),
    "beauty-bert4rec": ("RecTools SASRec 0.0359 / 0.0595", "≥ 0.038 / ≥ 0.062"),
}
BASELINES = ("popularity", "item_knn", "ease")


def hardware() -> str:
    """The machine of this run: the GPU when training can use one, else the CPU (benchmarks.machine)."""
    return machine(torch.device("cuda") if torch.cuda.is_available() else None)


def run_seed(
    dataset: str, config: Path, seed: int, data_root: Path, overrides: list[str], work_root: Path, tag: str,
    resume: bool = False, test: bool = True, earlier: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """One seed through the features, train and evaluate jobs; a JSON-able record of it.

    ``resume``: training continues the killed run (of any date) of the same work directory and config from its last
    checkpoint (``train.max_time_s`` may differ: a small one ends it after one more epoch), instead of
    starting afresh; ``wall_s`` then covers this call only, the train report's history all epochs. A run that
    had finished resumes as finished: ``resume`` with ``test`` scores the test split of a candidate that a
    sweep trained without it (``test=False``: validation only, the record's ``results`` empty), once it has
    been chosen on validation, as PROTOCOL.md asks (the test target scored once, for the chosen model).
    """
    cfg = load_config(
        config,
        [f"data.path={data_root / DATASETS[dataset]}", f"work_dir={work_root / f'{tag}-seed{seed}'}",
         f"train.seed={seed}", "train.progress=false", *overrides],
    )
    check_protocol(cfg)
    if test:
        check_tested_once(earlier, tag, seed, settings_hash(cfg))
    code = commit()  # of the code that runs: HEAD may move during a run of hours
    load_before = load_1min()
    start = time.perf_counter()
    build_features.run(cfg)
    model_dir = train.run(cfg, resume_date(cfg) if resume else None)
    trained = json.loads((model_dir / "train_report.json").read_text())
    if resume and trained.get("resumed_from_epoch") is None:  # defensive: resume_date found its checkpoint
        raise RuntimeError(f"--resume: training of {cfg.work_dir} started afresh instead of resuming")
    report = json.loads((evaluate.run(cfg) / "report.json").read_text()) if test else {}
    wall = time.perf_counter() - start
    return {
        "date": dt.date.today().isoformat(), "dataset": dataset, "tag": tag, "seed": seed,
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "overrides": overrides, "config_sha256": settings_hash(cfg), "tested": test, "wall_s": wall,
        "train": trained,
        "results": {name: report[name] for name in ("model", *BASELINES) if name in report},
        "hardware": hardware(), "commit": code,
        # what shared the machine: the 1-minute load average before and after, and this process's threads
        "load_1min": [round(load_before, 2), round(load_1min(), 2)], "threads": torch.get_num_threads(),
    }


def check_tested_once(earlier: list[dict[str, Any]], tag: str, seed: int, settings: str) -> None:
    """Raise ValueError if ``earlier`` records (the --json-out file) already hold a test score of this tag, seed
    and settings (any time budget): PROTOCOL.md scores the test split once per chosen model, and a second score
    (e.g. after a longer budget) would be a choice made on test."""
    for r in earlier:
        if r.get("tested") and (r.get("tag"), r.get("seed"), r.get("config_sha256")) == (tag, seed, settings):
            raise ValueError(f"{tag} seed {seed} with these settings was already scored on the test split on "
                             f"{r.get('date')} (commit {r.get('commit')}); the test split is scored once per chosen "
                             "model: train further with --no-test, or record under another --tag if this is a new "
                             "candidate")


def resume_date(cfg: Config) -> dt.date:
    """The run date of the latest checkpoint directory of this training config (``<date>-<training hash>``, any date:
    a run killed yesterday resumes today). Raises ValueError when there is none: a resume with other settings
    (an override added or dropped, another --data-root) used to retrain from scratch without a word."""
    name = training_hash(cfg)[:12]  # as in pipelines.schedule.checkpoint_dir
    dates = sorted(dt.date.fromisoformat(p.name[:10]) for p in WorkDir.of(cfg).checkpoints.glob(f"????-??-??-{name}")
                   if p.is_dir())
    if not dates:
        raise ValueError(f"--resume: no checkpoint of this config in {WorkDir.of(cfg).checkpoints} (directories "
                         f"<date>-{name}); pass the same --config, --data-root and KEY=VALUE overrides as the run "
                         "to resume (train.max_time_s, train.progress and keys outside data, features, model, train and "
                         "evaluate.exclude_seen may differ), or run without --resume")
    return dates[-1]


def check_protocol(cfg: Config) -> None:
    """Raise ValueError unless ``cfg`` evaluates as PROTOCOL.md says: leave-one-out, the test split, seen items
    excluded (the row's columns say "test" and are compared with published numbers)."""
    off = {key: value for key, value, want in (
        ("features.split", cfg.features.split, "leave_one_out"), ("evaluate.split", cfg.evaluate.split, "test"),
        ("evaluate.exclude_seen", cfg.evaluate.exclude_seen, True)) if value != want}
    if off:
        raise ValueError(f"not the protocol of ../shared/PROTOCOL.md: {off}; a benchmark row is leave-one-out "
                         "test with seen items excluded")


def settings_hash(cfg: Config) -> str:
    """SHA-256 of the resolved config less what may differ between the seeds of one row: the seed, the work
    directory, the data path (the data root), progress bars and the time budget (recorded per seed)."""
    tree = cfg.to_dict()
    tree.pop("work_dir", None)
    tree["data"].pop("path", None)
    tree["train"] = without_budget({k: v for k, v in tree["train"].items() if k not in ("seed", "progress")})
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _metric(records: list[dict[str, Any]], name: str, key: str) -> str:
    values = [r["results"][name][key] for r in records if name in r["results"]]
    return _ms(values) if len(values) == len(records) else "—"


HEADER = (
    "| date | dataset | config + overrides | seeds | test NDCG@10 | test HR@10 | val NDCG@10 | popularity | "
    "item-kNN | EASE | best published (target) | best epoch (run) | s/epoch train (+val) | train s | total s | "
    "hardware | commit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(records: list[dict[str, Any]]) -> str:
    """One markdown row for the seeds of one (dataset, config, overrides); baselines give NDCG@10.

    Raises ValueError if a seed comes twice (a rerun appended to the same records) or the records hold
    different resolved settings (``config_sha256``, where recorded); several commits or machines are all listed.
    """
    records = sorted(records, key=lambda r: r["seed"])
    seeds = [r["seed"] for r in records]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds {seeds} of {records[0]['tag']}: a seed comes twice; keep one record per seed")
    settings = {r.get("config_sha256") for r in records} - {None}
    if len(settings) > 1:
        raise ValueError(f"{records[0]['tag']}: the seeds' records hold {len(settings)} different resolved "
                         "configs (config_sha256): not one row")
    first = records[0]
    trains = [r["train"] for r in records]
    epochs = "/".join(f"{t['best_epoch']}({t['epochs_run']})" for t in trains)
    per_epoch = (f"{statistics.mean(t.get('train_seconds_per_epoch', float('nan')) for t in trains):.3f} "
                 f"({statistics.mean(t['seconds_per_epoch'] for t in trains):.3f})")
    anchor, target = ANCHORS[first["dataset"]]
    common = [o for o in first["overrides"] if all(o in r["overrides"] for r in records)]
    extra = "".join(f"; seed {r['seed']} also: {' '.join(o for o in r['overrides'] if o not in common)}"
                    for r in records if set(r["overrides"]) - set(common))
    cells = [
        first["date"], first["dataset"], f"`{first['config']} {' '.join(common)}`".replace(" `", "`") + extra,
        ",".join(str(r["seed"]) for r in records) + (f" (n={len(records)}, below the protocol's 3)"
                                                     if len(records) < 3 else ""),
        _metric(records, "model", "ndcg_at_10"), _metric(records, "model", "hr_at_10"),
        _ms([t["best_val_ndcg_at_10"] for t in trains]),
        *(_metric(records, name, "ndcg_at_10") for name in BASELINES),
        f"{anchor} ({target})", epochs + ", 0-based", per_epoch,
        f"{statistics.mean(_train_seconds(t) for t in trains):.0f}",
        "—" if any(t.get("resumed_from_epoch") is not None for t in trains)  # wall_s: the resuming call only
        else f"{statistics.mean(r['wall_s'] for r in records):.0f}", _distinct(records, "hardware"),
        _distinct(records, "commit"),
    ]
    return "| " + " | ".join(cells) + " |"


def _train_seconds(train: dict[str, Any]) -> float:
    """Training wall time of all epochs, those before a resume included (the report's wall_time_s covers the
    last call only): the history's elapsed seconds, where there is one."""
    history = train.get("history") or []
    return float(history[-1]["elapsed_s"]) if history and train.get("resumed_from_epoch") is not None \
        else float(train["wall_time_s"])


def _distinct(records: list[dict[str, Any]], key: str) -> str:
    """The records' ``key`` values, each once, in seed order: one, or all of them with "/"."""
    return " / ".join(dict.fromkeys(str(r[key]) for r in records))


def append_rows(path: Path, rows: list[str]) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    header_line = HEADER.splitlines()[0]
    if header_line not in text:
        text = text.rstrip("\n") + "\n\n## Sequential recommendation (PROTOCOL.md, test split)\n\n" + HEADER + "\n"
    lines = text.rstrip("\n").split("\n")
    # Rows go right under the table they belong to (the table ends at the first non-row line after its header).
    at = lines.index(header_line) + 2
    while at < len(lines) and lines[at].startswith("| "):
        at += 1
    lines[at:at] = rows
    path.write_text("\n".join(lines) + "\n")


def group_records(records: list[dict[str, Any]], by_tag: bool = False) -> list[list[dict[str, Any]]]:
    """Records grouped by (dataset, config, overrides, tag), or by (dataset, config, tag) only with ``by_tag``
    (seeds of one configuration run with different safety settings, listed per seed in the row), in
    first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        key = (r["dataset"], r["config"], r["tag"]) if by_tag else (r["dataset"], r["config"], tuple(r["overrides"]), r["tag"])
        key += (r.get("config_sha256"),)  # records from before it was recorded: None
        groups[key].append(r)
    return list(groups.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS))
    parser.add_argument("--config", type=Path, help="default conf/benchmarks/<dataset>.yaml")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42],
                        help="comma-separated, e.g. 42,43,44")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-root", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--tag", help="work directory prefix (default: the config file's stem)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json-out", type=Path, help="append one JSON line per finished seed")
    parser.add_argument("--no-table", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--resume", action="store_true",
                        help="continue the killed run (of any date) of each seed from its last checkpoint (same "
                             "config, data root and overrides; train.max_time_s may differ) instead of starting "
                             "afresh; an error if there is none")
    parser.add_argument("--no-test", action="store_true",
                        help="validation only (a sweep's candidates): no test score, no table row; score the "
                             "chosen one later with --resume")
    parser.add_argument("--from-json", type=Path, nargs="+", help="only write the table rows of these records")
    parser.add_argument("--group-by-tag", action="store_true",
                        help="one row per (dataset, config, tag) even if the seeds' overrides differ")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        records = read_records(args.from_json)
    else:
        if args.dataset is None:
            parser.error("--dataset is required unless --from-json is given")
        config = (args.config or ROOT / "conf" / "benchmarks" / f"{args.dataset}.yaml").resolve()
        tag = args.tag or config.stem
        records = []
        earlier = read_records([args.json_out]) if args.json_out is not None and args.json_out.is_file() else []
        for seed in args.seeds:
            record = run_seed(args.dataset, config, seed, args.data_root.resolve(), args.overrides,
                              args.work_root, tag, resume=args.resume, test=not args.no_test, earlier=earlier)
            records.append(record)
            append_record(args.json_out, record)
            m = record["results"].get("model")
            test = "no test (validation only)" if m is None else \
                f"test NDCG@10 {m['ndcg_at_10']:.4f} HR@10 {m['hr_at_10']:.4f}"
            print(f"{tag} seed {seed}: {test} val NDCG@10 {record['train']['best_val_ndcg_at_10']:.4f}, "
                  f"{record['wall_s']:.0f} s", flush=True)
    untested = [r for r in records if not r["results"]]
    if untested:
        print(f"{len(untested)} record(s) without a test score (validation only): not in the table")
    tested = [r for r in records if r["results"]]
    rows = [table_row(group) for group in group_records(tested, args.group_by_tag)]
    if not args.no_table:
        append_rows(args.output, rows)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
