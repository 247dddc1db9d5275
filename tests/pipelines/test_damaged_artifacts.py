"""Files an earlier job wrote, damaged from outside (truncated by a full disk, overwritten, copied in from another
work directory): each job names the file and what rebuilds it, with exit 2, instead of a library traceback with
exit 1; a damaged success marker reruns its date; `recsys status` shows the rest of the pipeline."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from pipelines.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tests.hostile.cli_run import run_cli, snapshot
from tests.pipelines.conftest import tiny

DATE = "2024-05-01"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    work = tmp_path_factory.mktemp("damaged") / "work"
    shutil.copytree(tiny_features, work / "features")
    assert main(["run", "--quiet", "--run-date", DATE, *tiny(work)]) == EXIT_OK
    return work


@pytest.fixture
def work(night: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(night, copy)
    return copy


def _raises(exc: BaseException):
    """A stand-in for a function that fails with ``exc``."""
    def fail(*args, **kwargs):
        raise exc

    return fail


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("damage, argv, says", [
    (lambda w: _truncate(w / "features" / "sequences.parquet", 500), ["train", "--force"],
     ("features/sequences.parquet is damaged", "rebuild the features with `recsys features`")),
    (lambda w: (w / "features" / "manifest.json").write_text("{garbage"), ["evaluate"],
     ("features/manifest.json is damaged", "rebuild the features")),
    (lambda w: _truncate(w / "model" / "model.pt", 1000), ["candidates", "--date", "2024-05-02"],
     ("model/model.pt is damaged", "rerun `recsys train`")),
    (lambda w: (w / "model" / "model.pt").write_bytes(b""), ["evaluate"], ("model/model.pt is damaged",)),
    (lambda w: (w / "model" / "model.json").write_text("{}"), ["candidates", "--date", "2024-05-02"],
     ("model/model.json is damaged",)),
    (lambda w: _truncate(w / "candidates" / f"date={DATE}" / "candidates.parquet", 100),
     ["candidates", "--date", "2024-05-02"], (f"date={DATE}/candidates.parquet is damaged", "aside")),
    (lambda w: shutil.copy(w / "features" / "user_map.parquet", w / "features" / "item_map.parquet"),
     ["evaluate"], ("item_map.parquet",)),
    # a shard's own previous partition (read first for its user id type: a traceback, exit 1, before)
    (lambda w: (shutil.copytree(w / "candidates" / f"date={DATE}", w / "candidates" / "shard=0-of-2" / f"date={DATE}"),
                _truncate(w / "candidates" / "shard=0-of-2" / f"date={DATE}" / "candidates.parquet", 100)),
     ["candidates", "--date", "2024-05-02", "--shard", "0/2"], (f"shard=0-of-2/date={DATE}/candidates.parquet is damaged",)),
])
def test_a_damaged_artifact_is_named_with_exit_2_and_nothing_changes(work: Path, capsys, damage, argv, says) -> None:
    damage(work)
    before = snapshot(work / "candidates")
    got = run_cli(capsys, *argv, "--quiet", *tiny(work))
    assert got.code == EXIT_USAGE, got.err
    assert "Traceback" not in got.err and all(s in got.err for s in says), got.err
    assert snapshot(work / "candidates") == before


def test_feature_tables_of_two_builds_are_refused(work: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    assert main(["features", "--quiet", *tiny(other, "data.synthetic.n_users=300", "data.synthetic.seed=9")]) \
        == EXIT_OK
    shutil.copy(other / "features" / "sequences.parquet", work / "features" / "sequences.parquet")
    got = run_cli(capsys, "candidates", "--quiet", "--date", "2024-05-02", *tiny(work))
    assert got.code == EXIT_USAGE and "its files are not of one build (users: sequences.parquet 300, " \
        "user_map.parquet 200, manifest.json n_users 200)" in got.err, got.err


def test_a_damaged_success_marker_reruns_its_date(work: Path, capsys) -> None:
    assert main(["train", "--quiet", "--run-date", DATE, *tiny(work)]) == EXIT_OK
    marker = work / "runs" / "train" / f"{DATE}.json"
    marker.write_text('{"job": "train", "run_da')
    got = run_cli(capsys, "train", "--quiet", "--run-date", DATE, *tiny(work))
    assert got.code == EXIT_OK and "taken as not done" in got.err, got.err
    assert '"config_hash"' in marker.read_text()  # rewritten whole


def test_status_names_damaged_files_and_shows_the_rest(work: Path, capsys) -> None:
    (work / "model" / "train_report.json").write_text("{x")
    (work / "candidates" / f"date={DATE}" / "manifest.json").write_text("")
    got = run_cli(capsys, "status", *tiny(work))
    assert got.code == EXIT_OK, got.err
    assert "UNREADABLE:  " in got.out and "train_report.json is damaged" in got.out
    assert f"date={DATE}/manifest.json is damaged" in got.out and "features:    built" in got.out


def test_lock_files_that_cannot_be_opened_are_named_with_exit_2(work: Path, capsys, monkeypatch) -> None:
    import pipelines.cli as cli

    monkeypatch.setattr(cli, "job_lock", _raises(PermissionError(errno.EACCES, "Permission denied",
                                                                 str(work / ".locks" / "evaluate.lock"))))
    got = run_cli(capsys, "evaluate", "--quiet", *tiny(work))
    assert got.code == EXIT_USAGE and "cannot open the lock files under" in got.err and "Traceback" not in got.err


def test_a_full_disk_is_one_line_with_exit_1(work: Path, capsys, monkeypatch) -> None:
    import pipelines.cli as cli

    monkeypatch.setattr(cli, "_execute", _raises(OSError(errno.ENOSPC, "No space left on device")))
    got = run_cli(capsys, "evaluate", "--quiet", *tiny(work))
    assert got.code == EXIT_FAILED and "the disk or quota is full" in got.err and "Traceback" not in got.err


def test_a_percent_sign_in_the_work_dir_keeps_the_store_there(tmp_path: Path) -> None:
    from recsys.config import load_config
    from recsys.tracking import tracking_uri

    work = tmp_path / "pct%41dir"
    uri = tracking_uri(load_config(None, [f"work_dir={work}"]))
    from sqlalchemy.engine import make_url

    assert make_url(uri).database == str(work / "mlflow.db")
    lone = tmp_path / "w%zz"  # not an escape: left as it is (escaping it made MLflow create a w%25zz directory)
    assert tracking_uri(load_config(None, [f"work_dir={lone}"])).endswith("/w%zz/mlflow.db")


def test_a_full_disk_while_taking_the_locks_is_not_blamed_on_their_owner(work: Path, capsys, monkeypatch) -> None:
    import pipelines.cli as cli

    monkeypatch.setattr(cli, "job_lock", _raises(OSError(errno.ENOSPC, "No space left on device")))
    got = run_cli(capsys, "evaluate", "--quiet", *tiny(work))
    assert got.code == EXIT_FAILED and "the disk or quota is full" in got.err and "owned by" not in got.err


def test_an_os_error_of_the_job_is_not_a_lock_problem(work: Path, capsys, monkeypatch) -> None:
    import pipelines.cli as cli

    monkeypatch.setattr(cli, "_execute", _raises(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    got = run_cli(capsys, "evaluate", "--quiet", *tiny(work))
    assert got.code == EXIT_FAILED and "lock files" not in got.err


def test_a_file_it_may_not_read_is_no_damaged_file(tmp_path: Path, monkeypatch) -> None:
    """Run by hand under another account: "damaged, rerun recsys train" sent the operator the wrong way."""
    import polars as pl

    from recsys.storage import read_parquet_file

    monkeypatch.setattr(pl, "read_parquet", _raises(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        read_parquet_file(tmp_path / "x.parquet", "rebuild it")


def test_a_damaged_marker_hides_only_itself_in_status(work: Path, capsys) -> None:
    assert main(["train", "--quiet", "--run-date", DATE, *tiny(work)]) == EXIT_OK
    (work / "runs" / "run" / f"{DATE}.json").write_text("{")
    got = run_cli(capsys, "status", *tiny(work))
    assert f"last success: recsys train for {DATE}" in got.out and "UNREADABLE:" in got.out, got.out


def test_a_readers_restore_leaves_other_readers_outputs_alone(work: Path) -> None:
    """Only model/ and features/ (written under the exclusive lock) are certainly dead leftovers for a reader; an
    evaluation being written by a reader in another PID namespace must survive."""
    import socket

    # a pid this PID namespace does not have: the other container's evaluate, alive there
    pid = next(p for p in range(4194000, 4194300) if not Path(f"/proc/{p}").exists())
    live = work / f".evaluation.tmp-{pid}-abcdef@{socket.gethostname()}"
    live.mkdir()
    (work / "model").rename(work / f".model.old-1-abcdef@{socket.gethostname()}")
    assert main(["candidates", "--quiet", "--date", "2024-05-02", *tiny(work)]) == EXIT_OK
    assert (work / "model" / "model.pt").is_file() and live.is_dir()


@pytest.mark.parametrize("damage, says", [
    (lambda db: _truncate(db, 40_000), "database disk image is malformed"),
    (lambda db: db.write_bytes(bytes(100) + db.read_bytes()[100:]), "file is not a database"),
])
def test_a_damaged_embedded_mlflow_store_is_named_with_exit_2(new_work, capsys, damage, says) -> None:
    """SQLAlchemy's error named neither the file nor what to do, with exit 1; a store only created is no damage."""
    work = new_work()
    on = tiny(work, "tracking.enabled=true", "train.max_epochs=1")
    assert main(["features", "--quiet", *on]) == EXIT_OK  # creates the embedded store
    damage(work / "mlflow.db")
    got = run_cli(capsys, "train", "--quiet", *on)
    assert got.code == EXIT_USAGE, got.err
    assert "Traceback" not in got.err and f"{work / 'mlflow.db'} is damaged" in got.err and says in got.err \
        and "Restore it from a backup" in got.err and f"{work / 'mlflow.db'}.damaged" in got.err, got.err
    assert not (work / "model").exists()


def test_a_damaged_page_mlflow_comes_upon_mid_job_names_the_store(new_work, capsys, monkeypatch) -> None:
    """The start checks the store's header and schema only (cheap whatever its size); a damaged data page found
    later by MLflow's own queries (SQLAlchemy wrapping SQLite's error) is named the same way, with exit 2. A lock
    is no damage."""
    import sqlite3

    import sqlalchemy.exc

    import recsys.tracking as tracking

    work = new_work()
    on = tiny(work, "tracking.enabled=true", "train.max_epochs=1")
    assert main(["features", "--quiet", *on]) == EXIT_OK
    malformed = sqlalchemy.exc.DatabaseError("SELECT …", {}, sqlite3.DatabaseError("database disk image is malformed"))
    monkeypatch.setattr(tracking, "_experiment_id", _raises(malformed))
    got = run_cli(capsys, "train", "--quiet", *on)
    assert got.code == EXIT_USAGE and f"{work / 'mlflow.db'} is damaged" in got.err and "malformed" in got.err \
        and "Traceback" not in got.err, got.err
    locked = sqlalchemy.exc.OperationalError("SELECT …", {}, sqlite3.OperationalError("database is locked"))
    db = sqlite3.connect(":memory:")  # a real constraint error (two jobs creating one experiment): no damage
    db.execute("CREATE TABLE t (name UNIQUE)")
    db.execute("INSERT INTO t VALUES ('recsys')")
    try:
        db.execute("INSERT INTO t VALUES ('recsys')")
    except sqlite3.IntegrityError as exc:
        taken = sqlalchemy.exc.IntegrityError("INSERT …", {}, exc)
    for harmless in (locked, taken):
        monkeypatch.setattr(tracking, "_experiment_id", _raises(harmless))
        got = run_cli(capsys, "train", "--quiet", *on)
        assert got.code == EXIT_FAILED and "is damaged" not in got.err
