"""MLflow retention (tracking.keep_days): old alias-less versions and old ended runs go, purged with their artifacts
in the embedded store; aliases, the served versions, the rollback target, RUNNING runs and the runs behind kept
versions stay; keep_days unset deletes nothing; a failing retention never fails a published night.

A synthetic store, not trained models: runs with an artifact and a metric each, ended at planted times, and
versions registered at planted times (the registry's clock patched), against run date 2024-06-30 and
keep_days=7 (cut-off 2024-06-24 00:00 UTC).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipelines import prune, run_all
from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from recsys import retention
from recsys.config import Config, ConfigError, load_config
from recsys.retention import cutoff, prune_tracking
from recsys.storage import read_json, write_json
from recsys.tracking import tracking_uri

RUN_DATE = dt.date(2024, 6, 30)
NAME = "sasrec"


def _ms(day: str) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp() * 1000)


@dataclass
class Store:
    """A work directory's embedded MLflow store with planted runs and versions."""

    cfg: Config
    client: MlflowClient
    experiment: str
    runs: dict[str, str] = field(default_factory=dict)  # label -> run id
    versions: dict[str, str] = field(default_factory=dict)  # label -> version

    @property
    def work(self) -> Path:
        return Path(self.cfg.work_dir)

    def run(self, label: str, ended: str | None, status: str = "FINISHED", experiment: str | None = None) -> str:
        """A run with an artifact and a metric, started an hour before ``ended`` (None: still RUNNING)."""
        start = _ms(ended or "2024-06-01T00:00") - 3_600_000
        run = self.client.create_run(experiment or self.experiment, start_time=start)
        run_id = run.info.run_id
        self.client.log_metric(run_id, "val/ndcg_at_10", 0.5, step=0)
        (self.work / "model.pt").write_bytes(b"weights of " + label.encode())
        self.client.log_artifact(run_id, str(self.work / "model.pt"), "model")
        if ended is not None:
            self.client.set_terminated(run_id, status, end_time=_ms(ended))
        self.runs[label] = run_id
        return run_id

    def version(self, label: str, created: str, run_id: str | None = None) -> str:
        """A version of NAME registered at ``created`` from ``run_id`` (default: a run ended then)."""
        import mlflow.store.model_registry.sqlalchemy_store as registry

        run_id = run_id or self.run(f"{label}-run", created)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        with pytest.MonkeyPatch.context() as clock:
            clock.setattr(registry, "get_current_time_millis", lambda: _ms(created))
            version = str(self.client.create_model_version(NAME, source=source, run_id=run_id).version)
        self.versions[label] = version
        return version

    def alive_versions(self) -> set[str]:
        return {str(mv.version) for mv in self.client.search_model_versions(f"name = '{NAME}'")}

    def run_ids(self, view: int = ViewType.ALL) -> set[str]:
        exps = [e.experiment_id for e in self.client.search_experiments()]
        return {r.info.run_id for r in self.client.search_runs(exps, run_view_type=view, max_results=1000)}

    def artifacts(self, label: str) -> Path:
        """``mlartifacts/<run id>`` of a planted run (the experiment's artifact location is ``mlartifacts``, as
        :func:`recsys.tracking.job_run` creates it; another experiment's runs are under ``elsewhere``)."""
        root = self.work / ("elsewhere" if label == "other_experiment" else "mlartifacts")
        return root / self.runs[label]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty migrated MLflow database, made once (the migrations take seconds), copied per test."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _store(tmp_path: Path, empty_store: Path, *overrides: str) -> Store:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(empty_store, work / "mlflow.db")
    cfg = load_config(None, [f"work_dir={work}", *overrides])
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.create_experiment(cfg.tracking.experiment, artifact_location=(work / "mlartifacts").as_uri())
    client.create_registered_model(NAME)
    return Store(cfg, client, experiment)


@pytest.fixture
def store(tmp_path: Path, empty_store: Path) -> Store:
    """Versions of several ages and aliases, runs of several ages and statuses (see the assertions)."""
    s = _store(tmp_path, empty_store, "tracking.keep_days=7")
    s.version("old", "2024-06-01T02:30")                  # goes
    s.version("champion", "2024-06-02T02:30")             # alias champion
    s.version("served", "2024-06-03T02:30")               # scored the latest candidates
    s.version("rollback", "2024-06-04T02:30")             # the version the champion replaced
    s.version("shadow", "2024-06-05T02:30")               # another alias
    s.version("older", "2024-06-10T02:30")                # goes
    s.version("last_minute", "2024-06-23T23:59")          # goes: just before the cut-off
    s.version("at_cutoff", "2024-06-24T00:00")            # stays: at the cut-off
    s.version("challenger", "2024-06-29T02:30")           # alias challenger, young anyway
    s.version("reused", "2024-06-28T02:30", run_id=s.run("old-run-of-young", "2024-05-20"))
    s.client.set_registered_model_alias(NAME, "champion", s.versions["champion"])
    s.client.set_model_version_tag(NAME, s.versions["champion"], "promotion.champion_version", s.versions["rollback"])
    s.client.set_registered_model_alias(NAME, "shadow", s.versions["shadow"])
    s.client.set_registered_model_alias(NAME, "challenger", s.versions["challenger"])
    s.run("finished", "2024-06-01T03:00")
    s.run("failed", "2024-06-02T03:00", status="FAILED")
    s.run("killed", "2024-06-03T03:00", status="KILLED")
    s.run("running", None)                                              # a killed job's run: RUNNING for ever
    s.run("resumed", "2024-06-01T03:00")                                # ended long ago, then resumed (start_run
    s.client.update_run(s.runs["resumed"], status="RUNNING")            # with its run_id): RUNNING, old end_time
    s.run("recent", "2024-06-29T03:00")
    other = s.client.create_experiment("someone-else", artifact_location=(s.work / "elsewhere").as_uri())
    s.run("other_experiment", "2024-06-01T03:00", experiment=other)
    night = s.work / "candidates" / f"date={RUN_DATE}"
    night.mkdir(parents=True)
    write_json(night / "manifest.json", {"date": str(RUN_DATE), "model": {"name": NAME, "version": s.versions["served"]}})
    return s


GONE_VERSIONS = ("old", "older", "last_minute")
GONE_RUNS = ("old-run", "older-run", "last_minute-run", "finished", "failed", "killed")
KEPT_RUNS = ("champion-run", "served-run", "rollback-run", "shadow-run", "at_cutoff-run", "challenger-run",
             "old-run-of-young", "running", "resumed", "recent", "other_experiment")


def test_only_old_versions_without_alias_or_use_go(store: Store) -> None:
    before = store.alive_versions()
    pruned = prune.run(store.cfg, RUN_DATE)
    gone = {store.versions[label] for label in GONE_VERSIONS}
    assert sorted(pruned.versions_deleted, key=int) == sorted(gone, key=int)
    assert store.alive_versions() == before - gone
    assert set(pruned.versions_kept) == {store.versions[k] for k in ("champion", "served", "rollback", "shadow")}
    assert store.client.get_registered_model(NAME).aliases == {
        "champion": int(store.versions["champion"]), "shadow": int(store.versions["shadow"]),
        "challenger": int(store.versions["challenger"])}


def test_an_alias_set_while_the_pass_runs_keeps_its_version(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = retention._old_versions

    def then_rollback(client: MlflowClient, *args: object) -> list[str]:
        doomed = listed(client, *args)
        client.set_registered_model_alias(NAME, "champion", store.versions["old"])  # an operator's rollback now
        return doomed

    monkeypatch.setattr(retention, "_old_versions", then_rollback)
    pruned = prune.run(store.cfg, RUN_DATE)
    assert store.versions["old"] not in pruned.versions_deleted and store.versions["old"] in store.alive_versions()
    assert store.versions["older"] in pruned.versions_deleted
    assert store.runs["old-run"] not in pruned.runs_deleted  # the run behind the version kept


def test_old_ended_runs_go_with_their_artifacts_and_the_rest_stays(store: Store) -> None:
    for label in (*GONE_RUNS, *KEPT_RUNS):
        assert store.artifacts(label).is_dir()
    pruned = prune.run(store.cfg, RUN_DATE)
    gone = {store.runs[label] for label in GONE_RUNS}
    assert set(pruned.runs_deleted) == gone and set(pruned.runs_purged) == gone and pruned.purge == "done"
    assert store.run_ids() == {store.runs[label] for label in KEPT_RUNS}  # purged: not even as deleted
    for label in ("running", "resumed"):
        assert store.client.get_run(store.runs[label]).info.status == "RUNNING"
    assert store.client.get_run(store.runs["resumed"]).info.end_time == _ms("2024-06-01T03:00")
    for label in GONE_RUNS:
        assert not store.artifacts(label).exists()  # the whole run directory, not only its artifacts/
    for label in KEPT_RUNS:
        assert (store.artifacts(label) / "artifacts" / "model" / "model.pt").is_file()
    with sqlite3.connect(store.work / "mlflow.db") as db:  # the metric rows went with the runs
        rows = db.execute("SELECT DISTINCT run_uuid FROM metrics").fetchall()
    assert {r for (r,) in rows} == {store.runs[label] for label in KEPT_RUNS}
    # the run behind a kept version still downloads
    assert store.client.download_artifacts(store.runs["served-run"], "model", str(store.work / "dl"))


def test_the_pass_is_recorded_and_a_second_pass_deletes_nothing_more(store: Store) -> None:
    first = prune.run(store.cfg, RUN_DATE)
    second = prune.run(store.cfg, RUN_DATE)
    assert (second.versions_deleted, second.runs_deleted) == ([], [])
    record = read_json(store.work / "retention" / f"date={RUN_DATE}.json")
    assert [p["versions_deleted"] for p in record["passes"]] == [first.versions_deleted, []]
    assert record["passes"][0]["runs_purged"] == first.runs_purged and record["passes"][0]["keep_days"] == 7
    # the records go with what they describe: a week later (keep_days 7) this date's record is past the cut-off
    later = RUN_DATE + dt.timedelta(days=7)
    prune.run(store.cfg, later)
    assert sorted(p.name for p in (store.work / "retention").iterdir()) == [f"date={later}.json"]


def test_a_run_soft_deleted_by_an_interrupted_pass_is_purged_by_the_next(store: Store) -> None:
    store.client.delete_run(store.runs["finished"])  # a pass killed between the soft delete and the purge
    assert store.runs["finished"] in prune.run(store.cfg, RUN_DATE).runs_purged
    assert store.runs["finished"] not in store.run_ids() and not store.artifacts("finished").exists()


def test_dry_run_and_unset_keep_days_delete_nothing(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    versions, runs = store.alive_versions(), store.run_ids(ViewType.ACTIVE_ONLY)
    dry = prune.run(store.cfg, RUN_DATE, dry_run=True)
    assert len(dry.versions_deleted) == len(GONE_VERSIONS) and len(dry.runs_deleted) == len(GONE_RUNS)
    unset = store.cfg.model_copy(update={"tracking": store.cfg.tracking.model_copy(update={"keep_days": None})})
    with pytest.raises(ConfigError, match="tracking.keep_days is null"):
        prune.run(unset, RUN_DATE)
    caplog.clear()  # the dry run's own lines (captured when an earlier test left the root logger at INFO)
    with caplog.at_level(logging.WARNING):
        prune.after_night(unset, RUN_DATE)
    assert not caplog.records
    assert store.alive_versions() == versions and store.run_ids(ViewType.ACTIVE_ONLY) == runs
    assert not (store.work / "retention").exists()


def test_the_latest_night_of_any_layout_and_the_work_directory_model_are_protected(tmp_path: Path) -> None:
    cfg = load_config(None, [f"work_dir={tmp_path}", "tracking.keep_days=3"])
    c = tmp_path / "candidates"

    def manifest(part: str, version: str | None, name: str = NAME) -> None:
        (c / part).mkdir(parents=True)
        write_json(c / part / "manifest.json", {"model": {"name": name, "version": version}})

    manifest("date=2024-06-01", "1")                                  # an older night: not protected
    manifest("shard=0-of-2/date=2024-06-03", "4")                     # the latest night, in two shards
    manifest("shard=1-of-2/date=2024-06-03", "5")
    manifest("rejected/date=2024-06-04", "6")                          # rejected: never served
    manifest("date=2024-06-02", "9", name="another-model")
    (c / "complete").mkdir()
    write_json(c / "complete" / "date=2024-06-02.json", {"model": {"name": NAME, "version": "3"}})
    write_json(c / "complete" / "date=2024-05-30.json", {"model": {"name": NAME, "version": "2"}})
    (tmp_path / "model").mkdir()
    write_json(tmp_path / "model" / "train_report.json", {"registered_model": NAME, "registered_version": 7})
    assert set(prune.served_versions(cfg)) == {"3", "4", "5", "7"}


def test_cutoff_keeps_the_run_date_and_the_days_before_it() -> None:
    assert cutoff(RUN_DATE, 7) == dt.datetime(2024, 6, 24, tzinfo=dt.UTC)
    assert cutoff(RUN_DATE, 1) == dt.datetime(2024, 6, 30, tzinfo=dt.UTC)


def test_recsys_prune_command(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--quiet", f"work_dir={store.work}", "--run-date", str(RUN_DATE)]
    assert main(["prune", *common, "tracking.keep_days=null"]) == EXIT_USAGE
    assert "tracking.keep_days is null" in capsys.readouterr().err
    before = store.alive_versions()
    assert main(["prune", *common, "--dry-run", "tracking.keep_days=7"]) == EXIT_OK
    assert "would delete 3 model versions" in capsys.readouterr().out and store.alive_versions() == before
    assert main(["prune", *common, "tracking.keep_days=7"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "deleted 3 model versions" in out and f"{len(GONE_RUNS)} runs" in out
    assert store.alive_versions() == before - {store.versions[label] for label in GONE_VERSIONS}


def _stub_jobs(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    for module, job in ((run_all.build_features, "features"), (run_all.train, "train"),
                        (run_all.evaluate, "evaluate"), (run_all.generate_candidates, "candidates")):
        monkeypatch.setattr(module, "run", lambda *a, job=job, **k: calls.append(job))


def test_recsys_run_prunes_after_publishing_and_a_failing_retention_fails_no_night(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _stub_jobs(monkeypatch, calls)
    real = prune.prune_tracking
    monkeypatch.setattr(prune, "prune_tracking", lambda *a, **k: (calls.append("retention"), real(*a, **k))[1])
    args = ["run", "--quiet", f"work_dir={store.work}", "tracking.keep_days=7", "--run-date", str(RUN_DATE)]
    assert main(args) == EXIT_OK
    assert calls == ["features", "train", "evaluate", "candidates", "retention"]
    assert store.versions["old"] not in store.alive_versions()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the store went away")

    monkeypatch.setattr(prune, "prune_tracking", broken)
    assert main([*args[:-1], "2024-06-29"]) == EXIT_OK  # published: the night succeeds, with a warning
    assert (store.work / "runs" / "run" / "2024-06-29.json").is_file()
    (log,) = [p for p in (store.work / "logs").glob("run-*.log") if "the store went away" in p.read_text()]
    assert "WARNING" in log.read_text() and "the night stands" in log.read_text()


class _Killed(BaseException):
    """What SIGTERM does in this test when nothing else handles it (its default would end pytest itself)."""


@pytest.fixture
def sigterm_after_a_deletion(monkeypatch: pytest.MonkeyPatch):
    """SIGTERM sent to this process after retention's first version deletion; unhandled it raises _Killed.
    Yields the test's own handler (what the job must put back)."""
    import signal

    from recsys.faults import FAULT_ENV, SIGNAL_ENV

    def killed(signum: int, frame: object) -> None:
        raise _Killed

    previous = signal.signal(signal.SIGTERM, killed)
    monkeypatch.setenv(FAULT_ENV, "retention-version-deleted")
    monkeypatch.setenv(SIGNAL_ENV, "TERM")
    try:
        yield killed
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_retention_of_a_published_night_ends_the_night_as_done(
        store: Store, monkeypatch: pytest.MonkeyPatch, sigterm_after_a_deletion) -> None:
    """A scheduler's timeout during a long first retention pass killed `recsys run` after its night was
    published: no marker, so the next call ran the whole night again from its features."""
    import signal

    from recsys.faults import FAULT_ENV

    _stub_jobs(monkeypatch, [])
    args = ["run", "--quiet", f"work_dir={store.work}", "tracking.keep_days=7", "--run-date", str(RUN_DATE)]
    assert main(args) == EXIT_OK
    assert signal.getsignal(signal.SIGTERM) is sigterm_after_a_deletion  # the job's handler is gone with the pass
    assert (store.work / "runs" / "run" / f"{RUN_DATE}.json").is_file()
    (log,) = (store.work / "logs").glob("run-*.log")
    assert "tracking retention stopped by SIGTERM" in log.read_text()
    gone = [label for label in GONE_VERSIONS if store.versions[label] not in store.alive_versions()]
    assert len(gone) == 1  # stopped after the first deletion, which the record lists (it was in no record)
    (stopped,) = read_json(store.work / "retention" / f"date={RUN_DATE}.json")["passes"]
    assert stopped["versions_deleted"] == [store.versions[gone[0]]] and stopped["stopped"] == "SIGTERM"
    monkeypatch.delenv(FAULT_ENV)
    assert main(["prune", "--quiet", f"work_dir={store.work}", "tracking.keep_days=7", "--run-date", str(RUN_DATE)]
                ) == EXIT_OK
    assert not {store.versions[label] for label in GONE_VERSIONS} & store.alive_versions()


def test_sigterm_stops_recsys_prune_with_143_and_records_what_it_deleted(store: Store, sigterm_after_a_deletion
                                                                          ) -> None:
    """`recsys prune` kept Python's default SIGTERM: killed after deleting a version, it recorded nothing."""
    with pytest.raises(SystemExit) as stopped:
        main(["prune", "--quiet", f"work_dir={store.work}", "tracking.keep_days=7", "--run-date", str(RUN_DATE)])
    assert stopped.value.code == 143
    (entry,) = read_json(store.work / "retention" / f"date={RUN_DATE}.json")["passes"]
    assert len(entry["versions_deleted"]) == 1 and entry["stopped"] == "SIGTERM"
    assert entry["versions_deleted"][0] not in store.alive_versions()


def test_sigterm_while_the_pass_is_recorded_still_ends_the_night_as_done(store: Store, monkeypatch) -> None:
    """The handler covered the deletions only: a SIGTERM while the record was written killed `recsys run`
    after its night was published (no marker)."""
    import os
    import signal

    _stub_jobs(monkeypatch, [])
    real = prune.record

    def terminated_while_recording(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(prune, "record", terminated_while_recording)

    def killed(signum: int, frame: object) -> None:
        raise _Killed

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        args = ["run", "--quiet", f"work_dir={store.work}", "tracking.keep_days=7", "--run-date", str(RUN_DATE)]
        assert main(args) == EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (store.work / "runs" / "run" / f"{RUN_DATE}.json").is_file()


def test_a_pass_stopped_midway_through_the_purge_lists_the_runs_it_purged(store: Store, monkeypatch) -> None:
    """runs_purged was filled when the purge returned: a pass stopped in it recorded none of the runs gone."""
    from mlflow.store.artifact import artifact_repository_registry

    calls: list[str] = []

    original = artifact_repository_registry.get_artifact_repository

    def second_fails(uri):
        calls.append(uri)
        if len(calls) == 2:
            raise RuntimeError("disk gone")
        return original(uri)

    monkeypatch.setattr(artifact_repository_registry, "get_artifact_repository", second_fails)
    with pytest.raises(RuntimeError, match="disk gone"):
        prune.run(store.cfg, RUN_DATE)
    (entry,) = read_json(store.work / "retention" / f"date={RUN_DATE}.json")["passes"]
    assert len(entry["runs_purged"]) == 1 and entry["purge"] == "started"
    assert entry["stopped"] == "RuntimeError: disk gone" and len(entry["runs_deleted"]) == len(GONE_RUNS)


def test_a_tracking_server_keeps_deleted_runs_for_its_operator(mlflow_server, tmp_path: Path) -> None:
    uri = mlflow_server.url
    cfg = load_config(None, [f"work_dir={tmp_path}", f"tracking.uri={uri}", "tracking.keep_days=1",
                             "tracking.experiment=retention-server", "tracking.registered_model=retention-server"])
    client = MlflowClient(uri)
    exp = client.create_experiment("retention-server")
    client.create_registered_model("retention-server")
    runs = []
    for _ in range(3):
        run = client.create_run(exp)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs.append(run.info.run_id)
    for run_id in runs[:2]:
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        client.create_model_version("retention-server", source=source, run_id=run_id)
    client.set_registered_model_alias("retention-server", "champion", "2")
    later = dt.date.today() + dt.timedelta(days=30)  # everything is old by then
    pruned = prune_tracking(cfg, later, {})
    assert pruned.versions_deleted == ["1"] and set(pruned.runs_deleted) == {runs[0], runs[2]}
    assert pruned.runs_purged == [] and "mlflow gc" in pruned.purge
    for run_id in (runs[0], runs[2]):  # marked deleted, still in the server's store
        assert client.get_run(run_id).info.lifecycle_stage == "deleted"
    assert client.get_run(runs[1]).info.lifecycle_stage == "active"  # behind the champion


def test_a_champion_holding_several_aliases_still_protects_its_rollback_target(tmp_path, empty_store) -> None:
    """Review: the alias map flipped to version -> alias kept one alias per version, so a champion also named
    `prod` lost the champion lookup and its rollback target was deleted."""
    s = _store(tmp_path, empty_store, "tracking.keep_days=7")
    s.version("rollback", "2024-06-01T02:30")
    s.version("champion", "2024-06-02T02:30")
    for alias in ("challenger", "champion", "prod"):
        s.client.set_registered_model_alias(NAME, alias, s.versions["champion"])
    s.client.set_model_version_tag(NAME, s.versions["champion"], "promotion.champion_version", s.versions["rollback"])
    pruned = prune.run(s.cfg, RUN_DATE)
    assert pruned.versions_deleted == [] and "rollback target" in pruned.versions_kept[s.versions["rollback"]]
    assert pruned.versions_kept[s.versions["champion"]] == "alias challenger, champion, prod"


def test_versions_and_runs_the_config_reads_a_model_from_are_kept(tmp_path, empty_store) -> None:
    """`train.init_from: models:/NAME/V` (or `runs:/ID/model`) would fail the next night's training once retention
    deleted its source."""
    s = _store(tmp_path, empty_store, "tracking.keep_days=7")
    s.version("pinned", "2024-06-01T02:30")
    s.version("old", "2024-06-02T02:30")
    pinned_run = s.run("pinned-run-source", "2024-06-03T03:00")
    cfg = s.cfg.model_copy(update={
        "train": s.cfg.train.model_copy(update={"init_from": f"models:/{NAME}/{s.versions['pinned']}"}),
        "candidates": s.cfg.candidates.model_copy(update={"model": f"runs:/{pinned_run}/model"})})
    pruned = prune.run(cfg, RUN_DATE)
    assert pruned.versions_deleted == [s.versions["old"]]
    assert pruned.versions_kept[s.versions["pinned"]].startswith("named by train.init_from")
    assert pinned_run not in pruned.runs_deleted and s.runs["old-run"] in pruned.runs_deleted


def test_a_run_date_in_the_future_is_refused(store: Store) -> None:
    with pytest.raises(ConfigError, match="is in the future"):
        prune.run(store.cfg, dt.date.today() + dt.timedelta(days=400))
    assert not (store.work / "retention").exists()


def test_artifacts_outside_the_stores_own_directory_are_never_deleted(tmp_path, empty_store) -> None:
    """A work directory copied from another keeps the other's absolute artifact paths in its store: purging a
    run there must not delete the other work directory's files."""
    s = _store(tmp_path, empty_store, "tracking.keep_days=7")
    other = tmp_path / "prod-artifacts"
    foreign = s.client.create_experiment("foreign-paths", artifact_location=other.as_uri())
    cfg = s.cfg.model_copy(update={"tracking": s.cfg.tracking.model_copy(update={"experiment": "foreign-paths"})})
    run_id = s.run("copied", "2024-06-01T03:00", experiment=foreign)
    pruned = prune.run(cfg, RUN_DATE)
    assert pruned.runs_purged == [run_id] and run_id not in s.run_ids()
    assert (other / run_id / "artifacts" / "model" / "model.pt").is_file()
