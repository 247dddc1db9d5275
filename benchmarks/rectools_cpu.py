"""CPU training speed: this project's SASRec against RecTools' ``SASRecModel``, side by side in one run.

    python benchmarks/rectools_cpu.py --epochs 3                    # the measurement (~10 min on 2 cores)
    python benchmarks/rectools_cpu.py --epochs 1 --max-users 300 --no-table      # a quick try

Same data (ML-1M, ``<data-root>/ml-1m/ml-1m.txt``, ``user item`` lines in time order per user), same split
(leave-one-out: each user's last 2 events held out, training sequences are the last ``max_len + 1`` train
events of every user with at least 2 of them), same model size (d = 64, 2 blocks, 1 head, dropout 0.2,
max length 200), same loss (full softmax cross-entropy over the catalogue), batch 128, Adam lr 1e-3, CPU,
fp32. Each side trains ``--epochs`` epochs in its own subprocess, one after the other, with the same thread
settings (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and ``torch.set_num_threads``):

- ours: ``python -m benchmarks.sequential`` (features → train → evaluate, the project's own jobs) in the
  project venv; s/epoch = the ``train_s`` of each epoch in the train report's history (the epoch without its
  validation pass; the epoch with it is reported too);
- RecTools: ``SASRecModel.fit`` in the separate venv given by ``--peer-python`` (``work/rectools-venv``,
  never a dependency of the project), no validation, s/epoch timed by a Lightning callback from
  ``on_train_epoch_start`` to ``on_train_epoch_end``.

Reported per side: the first epoch and the median of the epochs after it, ``/proc/loadavg`` before and after
(the machine may be shared), versions; the ratio is RecTools' median over ours. One row is added to the
"CPU training speed vs RecTools" table of BENCHMARKS.md (unless ``--no-table``). This file imports only the
standard library at module level, so the same file runs as the RecTools worker in the peer venv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_FILE = "ml-1m/ml-1m.txt"
# The shared model / training settings (both sides).
HIDDEN, N_BLOCKS, N_HEADS, DROPOUT, MAX_LEN, BATCH, LR = 64, 2, 1, 0.2, 200, 128, 1e-3
SEED = 42

SECTION = "## CPU training speed vs RecTools SASRecModel (issue #4)"
HEADER = (
    "| date | data | epochs | ours s/epoch train: first, median rest (+val) | RecTools s/epoch: first, median rest | "
    "RecTools / ours | process CPU s/epoch, median rest: ours / RecTools (ratio) | loadavg ours before → after | loadavg RecTools before → after | machine | versions | "
    "commit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# --------------------------------------------------------------------------------------------- helpers
def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def read_pairs(path: Path, max_users: int | None) -> list[tuple[str, str]]:
    """(user, item) lines in file order; with ``max_users`` only the first that many users (file order)."""
    pairs, users = [], set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        if max_users is not None and parts[0] not in users and len(users) >= max_users:
            continue
        users.add(parts[0])
        pairs.append((parts[0], parts[1]))
    return pairs


def n_train_sequences(pairs: list[tuple[str, str]]) -> tuple[int, int]:
    """(users, training sequences): users with >= 3 events lose their last 2 to val / test; a sequence per
    user with >= 2 train events (the rule of both sides)."""
    counts: dict[str, int] = {}
    for user, _ in pairs:
        counts[user] = counts.get(user, 0) + 1
    train = [c - 2 if c >= 3 else c for c in counts.values()]
    return len(counts), sum(1 for c in train if c >= 2)


def split_stats(values: list[float]) -> tuple[float, float]:
    """(first epoch, median of the epochs after it; the first when there is only one)."""
    return values[0], statistics.median(values[1:]) if len(values) > 1 else values[0]


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------------------------- ours
# Runs benchmarks.sequential with the thread setting; also records the process CPU time of each training
# epoch (without validation) by wrapping the hooks of the project's own epoch timer, when it has them.
OURS_WRAPPER = """
import atexit, json, runpy, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
cpu = []
try:
    from recsys.training import _EpochTimer as T
    start, val, end = T.on_train_epoch_start, T.on_validation_epoch_start, T.on_train_epoch_end
    def on_start(self, trainer, module):
        cpu.append([time.process_time(), None])
        start(self, trainer, module)
    def on_val(self, trainer, module):
        if not trainer.sanity_checking and cpu and cpu[-1][1] is None:
            cpu[-1][1] = time.process_time()
        val(self, trainer, module)
    def on_end(self, trainer, module):
        if cpu and cpu[-1][1] is None:
            cpu[-1][1] = time.process_time()
        end(self, trainer, module)
    T.on_train_epoch_start, T.on_validation_epoch_start, T.on_train_epoch_end = on_start, on_val, on_end
    atexit.register(lambda: open({cpu_out!r}, 'w').write(json.dumps([b - a for a, b in cpu if b is not None])))
except (ImportError, AttributeError):
    pass
sys.argv = ['benchmarks.sequential', *sys.argv[2:]]
runpy.run_module('benchmarks.sequential', run_name='__main__', alter_sys=True)
"""


def run_ours(python: Path, data_root: Path, work: Path, epochs: int, threads: int) -> dict[str, Any]:
    json_out = work / "ours.jsonl"
    args = [
        "--dataset", "ml-1m", "--data-root", str(data_root), "--work-root", str(work / "bench"),
        "--tag", "cpu-speed", "--no-table", "--json-out", str(json_out),
        "tracking.enabled=false", "evaluate.baselines=[popularity]", "train.accelerator=cpu",
        f"model.hidden={HIDDEN}", f"model.n_blocks={N_BLOCKS}", f"model.n_heads={N_HEADS}",
        f"model.dropout={DROPOUT}", f"model.max_len={MAX_LEN}", "train.loss=ce", f"train.lr={LR}",
        f"train.batch_size={BATCH}", f"train.max_epochs={epochs}", f"train.patience={epochs + 1}",
        "train.max_time_s=null", f"train.seed={SEED}",
    ]
    cpu_out = work / "ours_cpu.json"
    code = OURS_WRAPPER.format(cpu_out=str(cpu_out))
    before, start = loadavg(), time.perf_counter()
    with (work / "ours.log").open("w") as log:
        proc = subprocess.run([str(python), "-c", code, str(threads), *args], cwd=ROOT, env=thread_env(threads),
                              stdout=log, stderr=subprocess.STDOUT)
    wall, after = time.perf_counter() - start, loadavg()
    if proc.returncode != 0:
        raise SystemExit(f"ours failed (exit {proc.returncode}); see {work / 'ours.log'}")
    record = json.loads(json_out.read_text().splitlines()[-1])
    cpu_s = json.loads(cpu_out.read_text()) if cpu_out.is_file() else []
    history = record["train"]["history"]
    elapsed = [h["elapsed_s"] for h in history]
    with_val = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    versions = subprocess.run(
        [str(python), "-c", "import torch, pytorch_lightning as L; print(torch.__version__, L.__version__)"],
        capture_output=True, text=True, env=thread_env(threads)).stdout.split()
    return {
        "train_s": [h["train_s"] for h in history], "epoch_with_val_s": with_val, "train_cpu_s": cpu_s,
        "val_ndcg_at_10": [h["val_ndcg_at_10"] for h in history], "wall_s": wall,
        "train_wall_s": record["train"]["wall_time_s"], "n_users": record["train"]["n_users"],
        "n_items": record["train"]["n_items"], "load_before": before, "load_after": after,
        "torch": versions[0] if versions else "?", "lightning": versions[1] if len(versions) > 1 else "?",
        "hardware": record["hardware"],
    }


# --------------------------------------------------------------------------------------------- RecTools
def run_peer(python: Path, data_file: Path, work: Path, epochs: int, threads: int) -> dict[str, Any]:
    out = work / "rectools.json"
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", "rectools", "--data-file", str(data_file),
           "--epochs", str(epochs), "--threads", str(threads), "--worker-out", str(out)]
    before, start = loadavg(), time.perf_counter()
    with (work / "rectools.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=thread_env(threads), stdout=log, stderr=subprocess.STDOUT)
    wall, after = time.perf_counter() - start, loadavg()
    if proc.returncode != 0:
        raise SystemExit(f"RecTools failed (exit {proc.returncode}); see {work / 'rectools.log'}")
    result = json.loads(out.read_text())
    result.update(wall_s=wall, load_before=before, load_after=after)
    return result


def rectools_worker(args: argparse.Namespace) -> None:
    """Runs in the peer venv: RecTools SASRecModel.fit on the train split, each epoch timed."""
    import pandas as pd
    import pytorch_lightning as L
    import rectools
    import torch
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel
    from rectools.models.nn.item_net import IdEmbeddingsItemNet

    torch.set_num_threads(args.threads)
    L.seed_everything(SEED, workers=True)

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.train_s: list[float] = []
            self.train_cpu_s: list[float] = []
            self._start = self._cpu = 0.0

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._start, self._cpu = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.train_s.append(time.perf_counter() - self._start)
            self.train_cpu_s.append(time.process_time() - self._cpu)

    def get_trainer() -> L.Trainer:
        # the options of RecTools' default trainer (no checkpointing, no logger, no progress bar) on the CPU
        return L.Trainer(max_epochs=args.epochs, min_epochs=args.epochs, accelerator="cpu", devices=1,
                         deterministic=False, enable_progress_bar=False, enable_model_summary=False,
                         logger=False, enable_checkpointing=False, callbacks=[EpochTimer()])

    pairs = read_pairs(args.data_file, args.max_users)
    df = pd.DataFrame(pairs, columns=[Columns.User, Columns.Item])
    # file order is time order within a user: the row number as the timestamp keeps it
    df[Columns.Datetime] = pd.to_datetime(pd.RangeIndex(len(df)), unit="s")
    df[Columns.Weight] = 1.0
    pos_from_end = df.groupby(Columns.User, sort=False).cumcount(ascending=False)
    n_events = df.groupby(Columns.User, sort=False)[Columns.Item].transform("size")
    train = df[~((n_events >= 3) & (pos_from_end < 2))]  # leave-one-out: last 2 events are val / test
    dataset = Dataset.construct(train)
    model = SASRecModel(
        n_factors=HIDDEN, n_blocks=N_BLOCKS, n_heads=N_HEADS, dropout_rate=DROPOUT, session_max_len=MAX_LEN,
        train_min_user_interactions=2, loss="softmax", lr=LR, batch_size=BATCH, epochs=args.epochs,
        item_net_block_types=(IdEmbeddingsItemNet,), get_trainer_func=get_trainer, recommend_torch_device="cpu",
    )
    start = time.perf_counter()
    model.fit(dataset)
    fit_s = time.perf_counter() - start
    timer = next(cb for cb in model.fit_trainer.callbacks if isinstance(cb, EpochTimer))
    preparator = model.data_preparator
    result = {
        "train_s": timer.train_s, "train_cpu_s": timer.train_cpu_s, "fit_s": fit_s,
        "n_train_sequences": int(preparator.train_dataset.user_id_map.size),
        "n_items": int(preparator.train_dataset.item_id_map.size),
        "rectools": rectools.__version__, "torch": torch.__version__, "lightning": L.__version__,
        "threads": torch.get_num_threads(),
    }
    args.worker_out.write_text(json.dumps(result))
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------- report
def cpu_cell(ours: list[float] | None, peer: list[float] | None) -> str:
    """Process CPU seconds per training epoch (all threads; less sensitive to a shared machine than wall time,
    though spinning threads still add some)."""
    if not ours or not peer:
        return "—"
    o, p = split_stats(ours)[1], split_stats(peer)[1]
    return f"{o:.1f} / {p:.1f} ({p / o:.2f}×)"


def table_row(r: dict[str, Any]) -> str:
    ours, peer = r["ours"], r["rectools"]
    o_first, o_med = split_stats(ours["train_s"])
    ov_first, ov_med = split_stats(ours["epoch_with_val_s"])
    p_first, p_med = split_stats(peer["train_s"])
    subset = "" if r["max_users"] is None else f" (first {r['max_users']} users)"
    cells = [
        r["date"], f"ML-1M{subset}: "
        f"{r['n_users']} users, {r['n_train_sequences']} train sequences, max len {MAX_LEN}, "
        f"{ours['n_items']} / {peer['n_items'] - 1} items (ours / RecTools)",
        str(r["epochs"]),
        f"{o_first:.1f}, **{o_med:.1f}** ({ov_first:.1f}, {ov_med:.1f})",
        f"{p_first:.1f}, **{p_med:.1f}**",
        f"**{p_med / o_med:.2f}×**",
        cpu_cell(ours.get("train_cpu_s"), peer.get("train_cpu_s")),
        f"{ours['load_before']} → {ours['load_after']}", f"{peer['load_before']} → {peer['load_after']}",
        f"{r['cpu']}, {r['cores']} cores, {r['threads']} threads",
        f"torch {ours['torch']}, ours: pytorch-lightning {ours['lightning']}; RecTools {peer['rectools']}, "
        f"pytorch-lightning {peer['lightning']}, torch {peer['torch']}",
        r["commit"],
    ]
    return "| " + " | ".join(cells) + " |"


def append_row(path: Path, row: str) -> None:
    """Add ``row`` under the table of SECTION (the section is appended at the end of the file if missing)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    header_line = HEADER.splitlines()[0]
    if header_line not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{HEADER}\n"
    lines = text.rstrip("\n").split("\n")
    at = lines.index(header_line) + 2
    while at < len(lines) and lines[at].startswith("| "):
        at += 1
    lines[at:at] = [row]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--max-users", type=int, help="only the first N users of the file (quick tries)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--python", type=Path, default=ROOT / ".venv" / "bin" / "python", help="the project venv")
    parser.add_argument("--peer-python", type=Path, default=ROOT / "work" / "rectools-venv" / "bin" / "python",
                        help="the venv with rectools[torch] installed")
    parser.add_argument("--work-root", type=Path, default=ROOT / "work" / "rectools-cpu")
    parser.add_argument("--only", choices=["ours", "rectools"], help="run one side only (no table row)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-table", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--worker", choices=["rectools"], help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "rectools":
        rectools_worker(args)
        return

    source = (args.data_root / DATA_FILE).resolve()
    if not source.is_file():
        raise SystemExit(f"{source}: not found (--data-root)")
    args.work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=dt.datetime.now().strftime("%Y%m%d-%H%M%S-"), dir=args.work_root))
    pairs = read_pairs(source, args.max_users)
    data_root = args.data_root.resolve()
    if args.max_users is not None:  # both sides read the same subsampled file
        data_root = work / "data"
        (data_root / DATA_FILE).parent.mkdir(parents=True)
        (data_root / DATA_FILE).write_text("".join(f"{u} {i}\n" for u, i in pairs))
    n_users, n_seqs = n_train_sequences(pairs)
    print(f"{len(pairs)} events, {n_users} users, {n_seqs} train sequences; work dir {work}", flush=True)

    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "epochs": args.epochs, "max_users": args.max_users,
        "n_users": n_users, "n_train_sequences": n_seqs, "threads": args.threads, "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)), "commit": commit(),
    }
    if args.only != "rectools":
        print(f"ours: training {args.epochs} epoch(s); loadavg {loadavg()}", flush=True)
        report["ours"] = run_ours(args.python, data_root, work, args.epochs, args.threads)
        print(f"ours: train s/epoch {[round(s, 1) for s in report['ours']['train_s']]}, with val "
              f"{[round(s, 1) for s in report['ours']['epoch_with_val_s']]}, val NDCG@10 "
              f"{[round(v, 4) for v in report['ours']['val_ndcg_at_10']]}; loadavg {loadavg()}", flush=True)
    if args.only != "ours":
        print(f"RecTools: training {args.epochs} epoch(s); loadavg {loadavg()}", flush=True)
        report["rectools"] = run_peer(args.peer_python, data_root / DATA_FILE, work, args.epochs, args.threads)
        peer = report["rectools"]
        if peer["n_train_sequences"] != n_seqs:
            print(f"warning: RecTools trained on {peer['n_train_sequences']} sequences, ours on {n_seqs}")
        print(f"RecTools {peer['rectools']}: train s/epoch {[round(s, 1) for s in peer['train_s']]} "
              f"(fit {peer['fit_s']:.1f} s); loadavg {loadavg()}", flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    if args.only is None:
        row = table_row(report)
        o_med, p_med = split_stats(report["ours"]["train_s"])[1], split_stats(report["rectools"]["train_s"])[1]
        print(f"\nours {o_med:.1f} s/epoch, RecTools {p_med:.1f} s/epoch (median of the epochs after the "
              f"first): RecTools / ours = {p_med / o_med:.2f}x; process CPU s/epoch ours / RecTools: "
              f"{cpu_cell(report['ours'].get('train_cpu_s'), report['rectools'].get('train_cpu_s'))}\n{row}")
        if not args.no_table:
            append_row(args.output, row)
            print(f"row added to {args.output}")
    print(f"report: {work / 'report.json'}")


if __name__ == "__main__":
    main()
