"""Sequential-recommendation benchmark under ../shared/PROTOCOL.md; appends a row to BENCHMARKS.md.

    python -m benchmarks.sequential --dataset ml-1m [--seeds 42,43,44] [--data-root ../shared/data] [KEY=VALUE ...]

Runs the pipeline's own jobs (features → train → evaluate on the test split) once per seed with
``conf/benchmarks/<dataset>.yaml`` and records test NDCG@10 / HR@10 (mean ± std over seeds), the popularity
baseline from the same run, epochs, wall time, hardware and commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from pipelines import build_features, evaluate, train
from recsys.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    "ml-1m": "ml-1m/ml-1m.txt",
    "beauty-s3rec": "amazon-beauty-s3rec/Beauty.txt",
    "beauty-bert4rec": "amazon-beauty-bert4rec/beauty.txt",
}


def hardware() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def run_seed(dataset: str, seed: int, data_root: Path, overrides: list[str], work_root: Path) -> dict:
    cfg = load_config(
        ROOT / "conf" / "benchmarks" / f"{dataset}.yaml",
        [f"data.path={data_root / DATASETS[dataset]}", f"work_dir={work_root / f'{dataset}-seed{seed}'}",
         f"train.seed={seed}", "train.progress=false", *overrides],
    )
    start = time.perf_counter()
    build_features.run(cfg)
    model_dir = train.run(cfg)
    eval_dir = evaluate.run(cfg)
    wall = time.perf_counter() - start
    trained = json.loads((model_dir / "train_report.json").read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    return {"seed": seed, "wall_s": wall, "train": trained, "model": report["model"],
            "popularity": report["popularity"], "cfg": cfg}


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table_row(dataset: str, results: list[dict], overrides: list[str]) -> str:
    get = lambda part, key: [r[part][key] for r in results]  # noqa: E731
    epochs = "/".join(f"{r['train']['best_epoch']}({r['train']['epochs_run']})" for r in results)
    cells = [
        dt.date.today().isoformat(), dataset, f"conf/benchmarks/{dataset}.yaml {' '.join(overrides)}".strip(),
        ",".join(str(r["seed"]) for r in results), _ms(get("model", "ndcg_at_10")), _ms(get("model", "hr_at_10")),
        _ms(get("popularity", "ndcg_at_10")), epochs, f"{statistics.mean(get('train', 'seconds_per_epoch')):.1f}",
        f"{statistics.mean(get('train', 'wall_time_s')):.0f}", f"{statistics.mean([r['wall_s'] for r in results]):.0f}",
        hardware(), commit(),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = """| date | dataset | config + overrides | seeds | test NDCG@10 | test HR@10 | popularity NDCG@10 | best epoch (run) | s/epoch | train s | total s | hardware | commit |
|---|---|---|---|---|---|---|---|---|---|---|---|---|"""


def append_row(path: Path, row: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if HEADER.splitlines()[0] not in text:
        text = text.rstrip("\n") + "\n\n## Sequential recommendation (PROTOCOL.md, test split)\n\n" + HEADER + "\n"
    path.write_text(text.rstrip("\n") + "\n" + row + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42],
                        help="comma-separated, e.g. 42,43,44")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-root", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = []
    for seed in args.seeds:
        results.append(run_seed(args.dataset, seed, args.data_root.resolve(), args.overrides, args.work_root))
        r = results[-1]
        print(f"seed {seed}: test NDCG@10 {r['model']['ndcg_at_10']:.4f} HR@10 {r['model']['hr_at_10']:.4f} "
              f"(popularity {r['popularity']['ndcg_at_10']:.4f}), {r['wall_s']:.0f} s", flush=True)
    row = table_row(args.dataset, results, args.overrides)
    append_row(args.output, row)
    print(row)


if __name__ == "__main__":
    main()
