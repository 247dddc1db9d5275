"""DDP: each rank's share of the batches, and a real 2-process CPU (gloo) `recsys train` against one process.

The 2-process run is ``python -m pipelines.cli train train.devices=2``: Lightning re-runs that command line
with ``LOCAL_RANK=1`` for the second process, which takes the CLI's worker path (no lock, model, marker or
MLflow run). The one-process reference trains in this process while the two start up.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from recsys.config import ConfigError, load_config
from recsys.data import IndexBatchSampler
from recsys.distributed import RankBatches

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
RUN_DATE = "2024-06-01"

# 64 users with 14+ events each: after leave-one-out every user has >= model.max_len + 1 = 9 train items, so
# every training row holds exactly 8 targets. Each rank's half of a global batch then has the same number of
# target positions, and the mean of the two ranks' mean losses (DDP averages their gradients) is the
# one-process mean over the whole batch. Dropout 0 and the full softmax loss leave no randomness at all.
SETTINGS = [
    "data.source=synthetic", "data.synthetic.n_users=64", "data.synthetic.n_items=40",
    "data.synthetic.min_len=14", "data.synthetic.max_len=20", "data.synthetic.duplicate_rate=0.0",
    "model.max_len=8", "model.hidden=16", "model.n_blocks=1", "model.dropout=0.0", "train.max_epochs=3",
    "train.batch_size=32", "train.val_batch_size=32", "train.accelerator=cpu", "train.progress=false",
]
# Same global batch, so the same optimisation: what differs is only the order of float additions (two
# half-batch gradients all-reduced vs one full-batch sum), about 1e-7 relative per step. Measured: weights
# within 1.1e-6 and val NDCG@10 within 1e-7 after 3 epochs. The bounds leave room for other BLAS builds; val
# NDCG@10 gets 1e-3 because a score difference that small can still swap two near-tied items of a user.
WEIGHT_ATOL = 1e-4
NDCG_ATOL = 1e-3


def _sampler(n: int, batch_size: int, shuffle: bool = False) -> IndexBatchSampler:
    return IndexBatchSampler(n, batch_size, shuffle=shuffle, seed=3)


@pytest.mark.parametrize("world", [2, 3])
def test_training_shares_rebuild_every_batch_with_equal_parts(world: int) -> None:
    one = list(_sampler(23, 8, shuffle=True))
    shares = [list(RankBatches(_sampler(23, 8, shuffle=True), r, world, pad=True)) for r in range(world)]
    assert all(len(s) == len(one) == len(RankBatches(_sampler(23, 8), r, world, True)) for r, s in
               enumerate(shares))
    for step, batch in enumerate(one):
        parts = [s[step] for s in shares]
        assert len({len(p) for p in parts}) == 1  # the same number of rows on every rank
        joined = torch.stack(parts, 1).reshape(-1)  # dealt row by row: rank r holds rows r, r + world, ...
        assert torch.equal(joined[: len(batch)], batch)  # the one-process batch, in order
        assert set(joined[len(batch):].tolist()) <= set(batch.tolist())  # padding repeats the batch's own rows


def test_each_rank_gets_long_and_short_histories_of_a_length_sorted_batch() -> None:
    """A batch sorted longest first (train.group_by_length) used to be cut in contiguous parts: rank 0 took the
    longest histories, the last rank the shortest, so DDP weighed the positions unlike one process."""
    batch = torch.arange(12)  # rows 0..11, longest first
    parts = [next(iter(RankBatches(iter([batch]), r, 3, pad=True))) for r in range(3)]  # type: ignore[arg-type]
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_validation_shares_count_every_user_once() -> None:
    # 10 users in batches of 4 over 3 ranks: the last batch (2 users) leaves rank 2 without a part.
    shares = [list(RankBatches(_sampler(10, 4), r, 3, pad=False)) for r in range(3)]
    assert sorted(torch.cat([torch.cat(s) for s in shares]).tolist()) == list(range(10))
    assert [len(s) for s in shares] == [len(RankBatches(_sampler(10, 4), r, 3, False)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 2]


def test_a_batch_smaller_than_the_world_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size \(2\) is the global batch.*at least 4"):
        load_config(overrides=["train.devices=2", "train.num_nodes=2", "train.batch_size=2"])
    assert load_config(overrides=["train.devices=2", "train.strategy=ddp"]).train.num_nodes == 1


@pytest.mark.parametrize("job", ["features", "evaluate", "candidates"])
def test_only_training_runs_as_a_non_zero_rank(job: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main([job, f"work_dir={tmp_path}", "tracking.enabled=false"]) == EXIT_USAGE
    assert "other than rank 0 (LOCAL_RANK=1)" in capsys.readouterr().err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []  # no lock, log or output


def test_the_processes_a_run_starts_use_its_run_date_not_their_own_today(tmp_path: Path, monkeypatch) -> None:
    """A run started before midnight whose training (and so its other processes) starts after it: the
    workers used their own today, so rank 0 resumed one day's checkpoint and they another (and hung)."""
    import datetime as dt

    import pipelines.cli as cli
    import pipelines.train_worker as train_worker

    dates: dict[str, dt.date] = {}
    monkeypatch.setattr(cli, "today_utc", lambda: dt.date(2024, 6, 1))
    # the job, while it trains: the date it runs and what Lightning's launcher passes on to the other processes
    def rank0(cfg, run_date):  # noqa: ANN001, ANN202
        dates["rank0"], dates["passed on"] = run_date, os.environ.get("RECSYS_RUN_DATE")

    monkeypatch.setattr(cli, "_job", lambda name: rank0)
    common = [f"work_dir={tmp_path}", "tracking.enabled=false", "data.source=synthetic"]
    assert main(["train", "--quiet", *common]) == EXIT_OK
    assert dates.pop("passed on") == "2024-06-01" and "RECSYS_RUN_DATE" not in os.environ  # not after the job
    shutil.rmtree(tmp_path / "runs")  # the (stubbed) rank 0 marked the date done; the real one is still training
    monkeypatch.setenv("RECSYS_RUN_DATE", "2024-06-01")  # as the launcher's child inherits it
    monkeypatch.setattr(cli, "today_utc", lambda: dt.date(2024, 6, 2))  # after midnight
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train_worker, "run", lambda cfg, run_date, allow_resume: dates.setdefault("rank1", run_date))
    assert main(["train", "--quiet", *common]) == EXIT_OK
    assert dates == {"rank0": dt.date(2024, 6, 1), "rank1": dt.date(2024, 6, 1)}


@pytest.mark.parametrize("extra", [[], ["model.event_types=true"], ["data.synthetic.n_users=65"]],
                         ids=["items", "event_types", "odd_users"])
def test_two_process_ddp_matches_one_process(tmp_path: Path, extra: list[str]) -> None:
    """``extra``: also with each event's type embedded (the batches' type tables sharded like the items); with
    65 users, which 2 processes do not split evenly (validation NDCG@10 used to be divided by 64, 1.6 % high;
    the last training batch of 1 row is padded with that row, the same gradient)."""
    settings = [*SETTINGS, *extra]
    assert main(["features", "--quiet", f"work_dir={tmp_path / 'one'}", *settings,
                 "tracking.enabled=false"]) == EXIT_OK
    shutil.copytree(tmp_path / "one" / "features", tmp_path / "two" / "features")
    # Tracking on in the DDP run: it must record exactly one MLflow run and one model version. A checkpoint
    # interval (0: due every epoch) takes the path where rank 0's decision is broadcast before the collective
    # save; the weights must not change with it.
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--quiet", "--run-date", RUN_DATE,
           f"work_dir={tmp_path / 'two'}", *settings, "train.devices=2", "train.checkpoint_interval_s=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert main(["train", "--quiet", "--run-date", RUN_DATE, f"work_dir={tmp_path / 'one'}", *settings,
                 "tracking.enabled=false"]) == EXIT_OK
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, err.decode()[-3000:]

    one, two = (json.loads((tmp_path / w / "model" / "train_report.json").read_text()) for w in ("one", "two"))
    assert len(one["history"]) == len(two["history"]) == 3
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["val_ndcg_at_10"] - b["val_ndcg_at_10"]) <= NDCG_ATOL, (a, b)
    assert abs(one["best_val_ndcg_at_10"] - two["best_val_ndcg_at_10"]) <= NDCG_ATOL
    w1, w2 = (torch.load(tmp_path / w / "model" / "model.pt", weights_only=True) for w in ("one", "two"))
    assert w1.keys() == w2.keys() and ("type_emb.weight" in w1) == ("model.event_types=true" in extra)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=WEIGHT_ATOL, rtol=0, msg=name)

    # Rank 1 ran (its own log) and wrote nothing: one model, one marker, one MLflow run and model version.
    logs = sorted(p.name for p in (tmp_path / "two" / "logs").iterdir())
    assert [n.startswith("train-worker-") for n in logs] == [False, True], logs
    assert two["registered_version"] == "1"
    assert [p.name for p in (tmp_path / "two" / "runs" / "train").iterdir()] == [f"{RUN_DATE}.json"]
    with sqlite3.connect(tmp_path / "two" / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone() == (1,)
        assert db.execute("select count(*) from model_versions").fetchone() == (1,)


def test_every_process_of_a_ddp_run_warm_starts(tmp_path: Path) -> None:
    """Only rank 0 loads the earlier model; the other process gets its weights from DDP's broadcast (weight
    averaging's first copy is taken at the first step, after it). An epoch at a learning rate that moves no
    weight must then validate, over both processes' users, what the source validated."""
    source = tmp_path / "source"
    assert main(["features", "--quiet", f"work_dir={source}", *SETTINGS, "tracking.enabled=false"]) == EXIT_OK
    assert main(["train", "--quiet", f"work_dir={source}", *SETTINGS, "tracking.enabled=false"]) == EXIT_OK
    best = json.loads((source / "model" / "train_report.json").read_text())["best_val_ndcg_at_10"]
    shutil.copytree(source / "features", tmp_path / "warm" / "features")
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--quiet", f"work_dir={tmp_path / 'warm'}", *SETTINGS,
           "tracking.enabled=false", "train.devices=2", "train.max_epochs=1", "train.lr=1e-12",
           "train.ema_decay=0.999", f"train.init_from={source / 'model'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr.decode()[-3000:]
    warm = json.loads((tmp_path / "warm" / "model" / "train_report.json").read_text())
    assert abs(warm["history"][0]["val_ndcg_at_10"] - best) <= NDCG_ATOL
    assert warm["warm_start"]["items_new"] == 0
