"""Scheduled runs: --run-date and success markers, --force, the config hash, the per-job lock (exit 4)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipelines.cli import EXIT_INPUT, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, main
from pipelines.schedule import checkpoint_dir, config_hash, parse_run_date, training_hash
from recsys.config import load_config
from recsys.storage import read_json
from tests.pipelines.conftest import TINY, leftovers, tiny

DATE = "2024-05-01"


def _train(work: Path, *extra: str, date: str = DATE, flags: tuple[str, ...] = ()) -> int:
    return main(["train", "--quiet", "--run-date", date, *flags, *tiny(work, *extra)])


def _model_mtime(work: Path) -> int:
    return (work / "model" / "model.pt").stat().st_mtime_ns


def test_same_date_twice_is_a_noop_that_says_so(new_work, capsys) -> None:
    work = new_work()
    assert _train(work) == EXIT_OK
    marker = read_json(work / "runs" / "train" / f"{DATE}.json")
    assert marker["run_date"] == DATE and marker["outputs"]["model"] == str((work / "model").resolve())
    assert marker["config_hash"] == config_hash(load_config(None, tiny(work)))
    assert "model_version" in marker
    before = _model_mtime(work)
    capsys.readouterr()
    assert _train(work) == EXIT_OK
    out = capsys.readouterr().out
    assert f"{DATE} already succeeded" in out and "nothing to do" in out
    assert _model_mtime(work) == before
    log = sorted((work / "logs").glob("train-*.log"))[-1].read_text()
    assert "already succeeded" in log


def test_force_reruns_a_date_that_succeeded(new_work, capsys) -> None:
    work = new_work()
    assert _train(work) == EXIT_OK
    first = read_json(work / "runs" / "train" / f"{DATE}.json")
    before = _model_mtime(work)
    capsys.readouterr()
    assert _train(work, flags=("--force",)) == EXIT_OK
    assert "nothing to do" not in capsys.readouterr().out
    assert _model_mtime(work) != before
    assert read_json(work / "model" / "train_report.json")["resumed_from_epoch"] is None  # from scratch
    assert read_json(work / "runs" / "train" / f"{DATE}.json")["config_hash"] == first["config_hash"]


def test_changed_config_for_the_same_date_reruns(new_work, capsys) -> None:
    work = new_work()
    assert _train(work) == EXIT_OK
    first = read_json(work / "runs" / "train" / f"{DATE}.json")
    capsys.readouterr()
    assert _train(work, "train.lr=0.002") == EXIT_OK
    assert "nothing to do" not in capsys.readouterr().out
    second = read_json(work / "runs" / "train" / f"{DATE}.json")
    assert second["config_hash"] != first["config_hash"]
    assert read_json(work / "model" / "train_report.json")["resumed_from_epoch"] is None
    # Only the latest run's checkpoints are kept; the previous (finished) run's directory is gone, its last.ckpt
    # (kept for a rerun of its date) notwithstanding.
    kept = sorted({p.parent.name for p in (work / "checkpoints").rglob("*.ckpt")})
    assert kept == [f"{DATE}-{training_hash(load_config(None, tiny(work, 'train.lr=0.002')))[:12]}"]


def test_lock_held_by_another_process_exits_4_until_that_process_dies(new_work, capsys) -> None:
    work = new_work()
    lock = work / ".locks" / "train.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(work) == EXIT_LOCKED
        err = capsys.readouterr().err
        assert str(lock) in err and f"pid {holder.pid}" in err
        assert not (work / "model").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert _train(work) == EXIT_OK  # the kernel released the dead holder's lock
    assert leftovers(work) == []


# Holds an exclusive flock on argv[1] the way `recsys` does (pid in the file) until killed.
_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_run_writes_its_marker_and_skips_a_done_date(tmp_path, capsys) -> None:
    work = tmp_path / "work"
    args = ["run", "--quiet", "--run-date", DATE, *tiny(work)]
    assert main(args) == EXIT_OK
    marker = read_json(work / "runs" / "run" / f"{DATE}.json")
    assert set(marker["outputs"]) == {"features", "model", "evaluation", "candidates"}
    assert (work / ".locks" / "run.lock").is_file()
    capsys.readouterr()
    assert main(args) == EXIT_OK
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["2024-13-01", "2024-02-30", "20240501", "yesterday"])
def test_bad_run_date_is_a_usage_error(text: str, capsys) -> None:
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_run_date(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--run-date", text, *TINY])
    assert exit_info.value.code == EXIT_USAGE
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_config_hash_ignores_work_dir_only(tmp_path) -> None:
    a = load_config(None, tiny(tmp_path / "a"))
    assert config_hash(a) == config_hash(load_config(None, tiny(tmp_path / "b")))
    assert config_hash(a) != config_hash(load_config(None, tiny(tmp_path / "a", "train.seed=1")))


def test_jobs_that_rewrite_the_features_or_model_never_overlap_jobs_that_read_them(tmp_path, tiny_features,
                                                                                   capsys) -> None:
    """The job locks are per job; the work directory lock keeps `features` / `train` / `run` (exclusive) apart
    from each other and from `evaluate` / `candidates` (shared: readers, shards, run side by side)."""
    from pipelines.schedule import work_dir_lock

    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    lock = work / ".locks" / "work_dir.lock"
    with work_dir_lock(work, "features", shared=False):  # a features job rebuilding the feature set
        assert _train(work) == EXIT_LOCKED
        err = capsys.readouterr().err
        assert str(lock) in err and f"`recsys features (pid {os.getpid()} on {socket.gethostname()}, started " in err
        assert main(["candidates", "--quiet", "--date", "2024-05-01", *tiny(work)]) == EXIT_LOCKED
    assert not (work / "model").exists() and not (work / "candidates").exists()
    assert _train(work) == EXIT_OK
    with work_dir_lock(work, "candidates", shared=True):  # a shard scoring the night
        for shard in ("0/2", "1/2"):  # readers share it
            assert main(["candidates", "--quiet", "--shard", shard, "--date", "2024-05-01", *tiny(work)]) == EXIT_OK
        assert main(["evaluate", "--quiet", *tiny(work)]) == EXIT_OK
        capsys.readouterr()
        assert main(["features", "--quiet", *tiny(work)]) == EXIT_LOCKED  # would rewrite what they read
        assert "jobs that read the features or the model (evaluate, candidates) are running" in \
            capsys.readouterr().err
    assert main(["features", "--quiet", *tiny(work)]) == EXIT_OK


def test_a_status_probe_of_the_lock_does_not_turn_a_starting_job_away(tmp_path) -> None:
    """`recsys status` takes each lock for a moment (a shared flock) to see whether it is held: a job starting
    in that moment waits for the probe (up to a second) instead of exiting 4."""
    import fcntl
    import threading

    from pipelines.schedule import LockedError, job_lock

    lock = tmp_path / ".locks" / "train.lock"
    lock.parent.mkdir()
    probing = threading.Event()

    def probe(seconds: float) -> None:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        probing.set()
        threading.Event().wait(seconds)
        os.close(fd)

    for seconds, held in ((0.2, False), (3.0, True)):  # a probe's moment; a real holder
        probing.clear()
        thread = threading.Thread(target=probe, args=(seconds,))
        thread.start()
        probing.wait()
        if held:
            with pytest.raises(LockedError, match="train.lock is held"), job_lock(tmp_path, "train"):
                pass
        else:
            with job_lock(tmp_path, "train"):
                assert lock.read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
        thread.join()


def test_a_lock_names_its_holders_pid_host_and_start(tmp_path) -> None:
    """Containers on one volume: a bare pid (1, of another PID namespace) names nobody; pid, host and start time
    say which container holds the lock and since when, in the locked message and in `recsys status`."""
    import datetime as dt

    from pipelines.schedule import LockedError, job_lock, lock_holders

    holder = f"pid {os.getpid()} on {socket.gethostname()}, started "
    with job_lock(tmp_path, "run"):
        with pytest.raises(LockedError) as locked, job_lock(tmp_path, "run"):
            pass
        running = lock_holders(tmp_path)
    assert f"run.lock is held by {holder}" in str(locked.value)
    assert running["run"].startswith(holder)
    started = dt.datetime.fromisoformat(running["run"].removeprefix(holder))
    assert abs((dt.datetime.now(dt.UTC) - started).total_seconds()) < 60
    import fcntl

    (tmp_path / ".locks" / "old.lock").write_text("4242\n")  # held by an earlier version: a bare pid
    with open(tmp_path / ".locks" / "old.lock") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match=r"old\.lock is held by pid 4242: "), job_lock(tmp_path, "old"):
            pass


def test_a_new_pod_clears_and_restores_what_a_run_killed_in_another_pod_left(new_work, tmp_path) -> None:
    """A features build killed mid-swap in pod-a left .features.old-… (the previous build) with features/
    missing. The next build, in pod-b and holding the work directory alone, puts the previous build back, so
    features.min_rows_ratio compares with it and stops a truncated export (exit 3) instead of skipping the gate
    as if there were no previous build."""
    work = new_work()
    rows_before = (work / "features" / "manifest.json").read_text()
    os.replace(work / "features", work / ".features.old-1-5eed@pod-a")
    (work / ".features.tmp-1-5eed@pod-a").mkdir()
    short = ["features.min_rows_ratio=0.5", "data.synthetic.n_users=20"]
    assert main(["features", "--quiet", *tiny(work, *short)]) == EXIT_INPUT
    assert (work / "features" / "manifest.json").read_text() == rows_before
    assert leftovers(work) == []


def test_unfinished_checkpoints_of_earlier_nights_go_once_a_later_night_succeeds(tmp_path) -> None:
    """A night killed in training leaves a resume point nobody resumes once a later night succeeded: pruned
    then; an unfinished run of this date (another config) or of a later date (a backfill) is kept."""
    from pipelines.schedule import ScheduledRun

    cfg = load_config(None, tiny(tmp_path / "work"))
    run = ScheduledRun(cfg, "run", parse_run_date("2024-05-05"))
    current = checkpoint_dir(cfg, run.run_date)
    root = current.parent
    dirs = {name: root / name for name in ("2024-05-02-aaaaaaaaaaaa", "2024-05-04-bbbbbbbbbbbb",
                                             "2024-05-05-cccccccccccc", "2024-05-07-dddddddddddd", "scratch")}
    for path in dirs.values():
        path.mkdir(parents=True)
        (path / "last.ckpt").write_bytes(b"resume point")
        (path / "best-epoch001.ckpt").write_bytes(b"best")
    (dirs["2024-05-04-bbbbbbbbbbbb"] / "last.ckpt").unlink()  # finished
    current.mkdir()
    (current / "last.ckpt").write_bytes(b"done")
    (current / "best-epoch003.ckpt").write_bytes(b"best")
    run.prune_checkpoints()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [current.name, "2024-05-05-cccccccccccc", "2024-05-07-dddddddddddd", "scratch"])
    assert sorted(p.name for p in current.iterdir()) == ["best-epoch003.ckpt", "finished", "last.ckpt"]  # a rerun
    # of the date resumes its last.ckpt; a later night's success removes the directory, finished as it is
    later = ScheduledRun(cfg, "run", parse_run_date("2024-05-06"))
    later_done = checkpoint_dir(cfg, later.run_date)
    later_done.mkdir()
    (later_done / "last.ckpt").write_bytes(b"done")
    later.prune_checkpoints()
    assert not current.exists() and (root / "2024-05-07-dddddddddddd").exists()
    # a backfill of an earlier date keeps a later night's finished run (its rerun resumes it)
    assert (later_done / "finished").exists()
    ScheduledRun(cfg, "run", parse_run_date("2024-05-01")).prune_checkpoints()
    assert later_done.exists()


def test_a_night_cut_by_its_time_budget_goes_on_under_a_larger_one(new_work) -> None:
    """README: a run stopped by train.max_time_s resumes under a larger budget. Its success used to prune
    last.ckpt, so the rerun (another marker hash: the budget) trained from scratch."""
    work = new_work()
    assert _train(work, "train.max_time_s=0.001", "train.max_epochs=3") == EXIT_OK
    cut = read_json(work / "model" / "train_report.json")
    assert cut["epochs_run"] == 1
    # another config's success of the date removes finished runs' directories, not this resume point
    assert _train(work, "train.max_epochs=1", "train.lr=0.002") == EXIT_OK
    assert _train(work, "train.max_time_s=3600", "train.max_epochs=3") == EXIT_OK
    more = read_json(work / "model" / "train_report.json")
    assert more["resumed_from_epoch"] == 0 and more["epochs_run"] == 3
    # the resume point of the latest success only (a rerun with another candidates key resumes it)
    assert [p.parent.name for p in (work / "checkpoints").rglob("last.ckpt")] == [
        checkpoint_dir(load_config(None, tiny(work, "train.max_epochs=3")), parse_run_date(DATE)).name]


def test_train_names_the_keys_when_the_features_leave_it_nothing_to_validate_on(tmp_path, capsys) -> None:
    """Equal time-split cutoffs (accepted: a features job alone may want no validation) leave no validation
    users: exit 2 naming the cutoffs (before: exit 1 with the trainer's traceback)."""
    work = tmp_path / "work"
    split = ("features.split=time", "features.val_cutoff=1000", "features.test_cutoff=1000")
    assert main(["features", "--quiet", *tiny(work, *split)]) == EXIT_OK
    assert _train(work, *split) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "0 with validation items" in err and "features.val_cutoff (1000)" in err and "Traceback" not in err
    assert not (work / "model").exists()


def test_gbce_with_more_negatives_than_the_catalogue_names_the_key(new_work, capsys) -> None:
    work = new_work()
    assert _train(work, "train.loss=gbce", "train.n_negatives=100") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "train.n_negatives <= n_items - 1 = 49" in err and "Traceback" not in err


def test_the_success_marker_is_written_only_once_the_outputs_are_durable(new_work, fsync_log, monkeypatch) -> None:
    """A power cut after the marker is written must not leave an empty model: every file of model/ is fsynced
    before the rename that publishes it, the work directory after that rename, and only then is the marker
    renamed into place."""
    work = new_work()
    events = fsync_log
    assert _train(work) == EXIT_OK
    monkeypatch.undo()
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(work / "model"))
    marker = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith(f"runs/train/{DATE}.json"))
    tmp = events[publish][1]
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {f"{tmp}/{p.name}" for p in (work / "model").iterdir() if p.is_file()} <= synced
    assert tmp in synced
    assert ("fsync", str(work)) in events[publish + 1:marker]


def test_a_key_added_at_its_default_leaves_the_run_identities_as_they_were(monkeypatch) -> None:
    """An upgrade that adds a config key (at its default) used to change every config hash: a run killed before
    it did not resume after it (a new checkpoint directory, a new run identity). Only non-default keys count."""
    import recsys.config as config_module
    from recsys.checkpoint import run_identity

    cfg = load_config(None, ["model.hidden=32", "train.max_time_s=60"])
    sequences = pl.DataFrame({"user_idx": [0, 1], "train_items": [[1, 2], [2, 3]]})
    before = (config_hash(cfg), training_hash(cfg), run_identity(cfg, sequences, 3))
    dump = config_module.Config.to_dict
    monkeypatch.setattr(config_module.Config, "to_dict",
                        lambda self: {**dump(self), "added": {"key": 1}})  # the upgrade: tonight and by default
    for section in (config_module.ModelConfig, config_module.TrainConfig):
        model_dump = section.model_dump
        monkeypatch.setattr(section, "model_dump",
                            lambda self, *a, _dump=model_dump, **k: {**_dump(self, *a, **k), "added_key": 0})
    assert (config_hash(cfg), training_hash(cfg), run_identity(cfg, sequences, 3)) == before
    other = load_config(None, ["model.hidden=48", "train.max_time_s=60"])  # a setting that differs still counts
    assert config_hash(other) != before[0] and run_identity(other, sequences, 3) != before[2]
    assert training_hash(load_config(None, ["model.hidden=32", "train.max_time_s=90"])) == before[1]


def test_a_night_rejected_by_the_drift_gate_retried_without_the_threshold_publishes_the_inspected_lists(
    new_work, tmp_path, capsys
) -> None:
    """README: to publish a rejected night, rerun without the threshold. The checkpoint directory was named by
    the whole config, so that rerun trained a new model (warm-started from whatever the first attempt had
    promoted) and published lists nobody had looked at. Only training keys name it now."""
    work = new_work()
    assert main(["run", "--quiet", "--run-date", DATE, *tiny(work)]) == EXIT_OK
    earlier = tmp_path / "night1-model"
    shutil.copytree(work / "model", earlier)
    night = ["run", "--quiet", "--run-date", "2024-05-02"]
    warm = tiny(work, f"train.init_from={earlier}", "train.max_epochs=3")
    assert main([*night, *warm, "candidates.min_overlap=0.999"]) != EXIT_OK
    rejected = pl.read_parquet(work / "candidates" / "rejected" / "date=2024-05-02" / "candidates.parquet")
    assert read_json(work / "model" / "train_report.json")["resumed_from_epoch"] is None
    assert _status(work, capsys)["candidates"]["rejected"] == ["2024-05-02"]
    assert main([*night, *warm]) == EXIT_OK  # the retry, threshold dropped
    status = _status(work, capsys)["candidates"]  # published now: no longer counted as rejected (an alert)
    assert status["rejected"] == [] and status["rejected_then_published"] == ["2024-05-02"]
    assert read_json(work / "model" / "train_report.json")["resumed_from_epoch"] is not None  # not trained again
    published = pl.read_parquet(work / "candidates" / "date=2024-05-02" / "candidates.parquet")
    assert published.equals(rejected)
    configs = [load_config(None, tiny(work, *extra)) for extra in
               ((), ("candidates.k=7", "evaluate.batch_size=3", "tracking.promotion_tolerance=0.5",
                     "train.max_time_s=5", "train.progress=true"), ("train.lr=0.01",), ("evaluate.exclude_seen=false",))]
    hashes = [training_hash(cfg) for cfg in configs]
    assert hashes[0] == hashes[1] and len({hashes[0], hashes[2], hashes[3]}) == 3


def test_a_night_that_succeeded_rerun_with_another_candidates_key_does_not_train_again(new_work) -> None:
    """Its success removed last.ckpt, so a rerun of the date with candidates.k changed (another marker hash)
    trained again, warm-started from its own first result, registered v2 and the gate promoted it over v1:
    the same data trained twice and a model judged against itself."""
    work = new_work()
    warm = ("tracking.enabled=true", "train.init_from=models:/sasrec@champion")
    assert main(["run", "--quiet", "--run-date", DATE, *tiny(work, *warm)]) == EXIT_OK
    first = read_json(work / "model" / "train_report.json")
    weights = (work / "model" / "model.pt").read_bytes()
    assert main(["run", "--quiet", "--run-date", DATE, *tiny(work, *warm, "candidates.k=7")]) == EXIT_OK
    again = read_json(work / "model" / "train_report.json")
    assert again["resumed_from_epoch"] is not None and again["registered_version"] == first["registered_version"]
    assert (work / "model" / "model.pt").read_bytes() == weights
    assert pl.read_parquet(work / "candidates" / f"date={DATE}" / "candidates.parquet").group_by("user_id").len(
        )["len"].max() == 7


def _status(work: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    import json

    capsys.readouterr()
    assert main(["status", f"work_dir={work}", "--json", "tracking.enabled=false"]) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def test_status_counts_a_night_republished_only_where_its_own_rejected_part_was_published_later(tmp_path) -> None:
    """A night with a rejected shard whose other shard was published, and a published night whose later rerun
    was rejected, were both listed as 'rejected, then published': the rejected gauge read 0."""
    import json
    import time

    from pipelines.status import _candidates

    def part(path: Path, name: str = "manifest.json") -> None:
        path.mkdir(parents=True)
        (path / name).write_text(json.dumps({"rows": 1, "users": 1, "fallback_users": 0, "model": {}}))
        time.sleep(0.01)  # distinct modification times

    root = tmp_path / "candidates"
    part(root / "shard=0-of-2" / "date=2024-05-02")  # shard 0 published, shard 1 rejected: half a night
    part(root / "rejected" / "shard=1-of-2" / "date=2024-05-02", "drift.json")
    part(root / "date=2024-05-03")  # published, then a rerun rejected (the earlier lists stay)
    part(root / "rejected" / "date=2024-05-03", "drift.json")
    part(root / "rejected" / "date=2024-05-04", "drift.json")  # rejected, then a rerun published it
    part(root / "date=2024-05-04")
    c = _candidates(root)
    assert c["rejected"] == ["2024-05-02", "2024-05-03"] and c["rejected_then_published"] == ["2024-05-04"]


def test_dates_far_ahead_and_a_run_night_that_is_not_its_run_date_are_refused(tmp_path, capsys) -> None:
    """A typo such as 2026-12-16 for 2026-12-06 was published as a night that `recsys status` then reported as
    the latest for ten days (the staleness alert silent); `recsys run --run-date D candidates.date=E` marked D
    done and replaced night E. Both are exit 2 before anything is read or written."""
    import datetime as dt

    from tests.hostile.cli_run import run_cli

    work = tmp_path / "work"
    ahead = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=10)).isoformat()
    tomorrow = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()
    for argv, says in [(["candidates", "--date", ahead], f"candidates.date (--date) {ahead} is 10 days after today"),
                       (["candidates", f"candidates.date={ahead}"], "is 10 days after today"),
                       (["train", "--run-date", ahead], f"--run-date {ahead} is 10 days after today"),
                       (["run", "--run-date", "2024-05-02", "candidates.date=2024-05-01"],
                        "candidates.date 2024-05-01 is not the run's date 2024-05-02")]:
        got = run_cli(capsys, *argv, "--quiet", *tiny(work))
        assert got.code == EXIT_USAGE and says in got.err, (argv, got.err)
        assert not work.exists()  # refused before the work directory is even created
    # a night written one day ahead (a scheduler east of UTC) is fine: refused later only for want of features
    got = run_cli(capsys, "candidates", "--date", tomorrow, "--quiet", *tiny(work))
    assert "after today" not in got.err and "run `recsys features` first" in got.err, got.err


def test_quiet_means_no_progress_bar_without_changing_the_runs_identity(tmp_path, capsys, tiny_features) -> None:
    """`--quiet` ("only warnings and the final summary") still printed Lightning's progress bars with the default
    train.progress=true; turning it off must not change the config hash of the run's marker either."""
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    overrides = [f"work_dir={work}", *TINY, "train.progress=true", "train.max_epochs=1"]
    assert main(["train", "--quiet", *overrides]) == EXIT_OK
    quiet = capsys.readouterr()
    assert "Epoch 0" not in quiet.out + quiet.err
    marker = read_json(work / "runs" / "train" / f"{_today()}.json")
    assert marker["config_hash"] == config_hash(load_config(None, overrides))
    assert main(["train", "--force", *overrides]) == EXIT_OK  # without --quiet the bar is back
    assert "Epoch 0" in "".join(capsys.readouterr())
    assert main(["train", "--quiet", "--force", *overrides]) == EXIT_OK
    assert "RECSYS_QUIET" not in os.environ  # nothing left for the rest of the process (a notebook, a benchmark)


def _today() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).date().isoformat()
