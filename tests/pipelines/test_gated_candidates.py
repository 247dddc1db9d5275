"""`recsys run` never serves a model that failed the promotion gate: the champion's lists go out instead."""

from __future__ import annotations

import polars as pl
import pytest

from pipelines.cli import EXIT_OK, main
from recsys.storage import read_json
from tests.pipelines.conftest import tiny

TRACK = ["tracking.enabled=true", "tracking.registered_model=gated"]


def _night(work, date: str, *extra: str) -> None:
    assert main(["run", "--quiet", "--run-date", date, *tiny(work, *extra), *TRACK]) == EXIT_OK


def test_run_serves_the_champion_when_the_gate_keeps_the_new_model_out(tmp_path):
    work = tmp_path / "work"
    _night(work, "2024-05-01")
    first = work / "candidates" / "date=2024-05-01"
    model = read_json(first / "manifest.json")["model"]
    assert (model["uri"], model["version"]) == (str(work / "model"), "1")  # model/ itself: v1, promoted
    _night(work, "2024-05-02", "train.max_epochs=1", "train.lr=1e-12")  # an untrained model: v2
    decision = read_json(work / "evaluation" / "promotion.json")
    assert (decision["version"], decision["promoted"], decision["champion_version"]) == ("2", False, "1")
    night = work / "candidates" / "date=2024-05-02"
    model = read_json(night / "manifest.json")["model"]
    assert (model["uri"], model["version"], model["alias"]) == ("models:/gated@champion", "1", "champion")
    # the same features, the same v1: the lists of the first night, not those of the model the gate refused
    assert pl.read_parquet(night / "candidates.parquet").equals(pl.read_parquet(first / "candidates.parquet"))


def test_evaluating_the_champion_again_keeps_its_decision_and_rollback_target(tmp_path):
    from mlflow import MlflowClient

    work = tmp_path / "work"
    assert main(["features", "--quiet", *tiny(work)]) == EXIT_OK
    # v1 (first model), then v2 (another model), promoted over v1 whatever its score (tolerance 1)
    for extra in ((), ("train.max_epochs=3", "tracking.promotion_tolerance=1")):
        assert main(["train", "--quiet", *tiny(work, *extra), *TRACK]) == EXIT_OK
        assert main(["evaluate", "--quiet", *tiny(work, *extra), *TRACK]) == EXIT_OK
        if not extra:  # the first champion gated again: nothing before it (the reason said "vNone")
            assert main(["evaluate", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
            assert read_json(work / "evaluation" / "promotion.json")["reason"].endswith("champion before it: none)")
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    gated = client.get_model_version("gated", "2").tags
    assert (gated["promotion.promoted"], gated["promotion.champion_version"]) == ("true", "1")
    assert main(["evaluate", "--quiet", *tiny(work, *extra), *TRACK]) == EXIT_OK  # a rerun (a retry, a look)
    assert client.get_model_version("gated", "2").tags == gated  # v1 stays the recorded rollback target
    aliases = client.get_registered_model("gated").aliases  # the SQL store gives ints
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "2", "challenger": "2"}
    decision = read_json(work / "evaluation" / "promotion.json")
    assert decision["promoted"] and decision["reason"].startswith(
        f"already the champion (gated by run {gated['promotion.run_id']}: val NDCG@10 ")
    assert decision["reason"].endswith("champion before it: v1)")


def test_a_retried_training_that_ends_with_the_same_weights_reuses_their_version(tmp_path):
    """Killed after registering, or failed in a later job: the retry resumes to the same weights, which must
    not become a new version (the gate would promote the copy over the original on a tie)."""
    from mlflow import MlflowClient

    work = tmp_path / "work"
    assert main(["features", "--quiet", *tiny(work)]) == EXIT_OK
    versions = []
    for extra in ((), (), ("train.max_epochs=3",)):  # the same run twice (--force: trained again), another
        assert main(["train", "--quiet", "--force", *tiny(work, *extra), *TRACK]) == EXIT_OK
        versions.append(read_json(work / "model" / "train_report.json")["registered_version"])
    assert versions == ["1", "1", "2"]
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    registered = client.search_model_versions("name = 'gated'")
    assert sorted(str(mv.version) for mv in registered) == ["1", "2"]  # the SQL store gives ints
    assert len({mv.tags["content_sha256"] for mv in registered}) == 2


def test_the_first_night_of_a_fresh_registry_trains_from_scratch_and_serves_its_model(tmp_path):
    """conf/prod.yaml warm-starts from and serves models:/NAME@champion: on a fresh store every night stopped with
    exit 2 ("no such model version") until someone ran one night by hand with both keys set to null."""
    from mlflow import MlflowClient

    work = tmp_path / "work"
    champion = "models:/gated@champion"
    _night(work, "2024-05-01", f"train.init_from={champion}", f"candidates.model={champion}")
    log = "".join(p.read_text() for p in (work / "logs").glob("run-*.log"))
    assert "has no promoted 'gated' model yet (a first run): training from scratch" in log
    assert read_json(work / "model" / "train_report.json")["warm_start"] is None
    model = read_json(work / "candidates" / "date=2024-05-01" / "manifest.json")["model"]
    assert (model["uri"], model["version"]) == (champion, "1")
    # the second night starts from that champion; a typo in the name, or an alias removed from a model that had
    # a champion (a rollback gone wrong), stays an error
    _night(work, "2024-05-02", f"train.init_from={champion}", f"candidates.model={champion}", "train.max_epochs=1")
    assert read_json(work / "model" / "train_report.json")["warm_start"]["version"] == "1"
    for wrong in ("models:/gatd@champion", "models:/gated@nosuchalias"):
        assert main(["train", "--quiet", "--force", *tiny(work, f"train.init_from={wrong}"), *TRACK]) == 2, wrong
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    client.delete_registered_model_alias("gated", "champion")
    assert main(["train", "--quiet", "--force", *tiny(work, f"train.init_from={champion}"), *TRACK]) == 2


def test_a_first_night_stopped_before_its_gate_retries_from_scratch(tmp_path):
    """Night one registered v1 and was stopped before evaluate (SIGTERM, a tracking outage at the gate): the
    retry found model 'gated' without a champion and failed with exit 2 every night after."""
    work = tmp_path / "work"
    champion = "models:/gated@champion"
    assert main(["features", "--quiet", *tiny(work)]) == EXIT_OK
    for _ in range(2):  # the first try, then its retry: both from scratch, nothing promoted yet
        assert main(["train", "--quiet", "--force", *tiny(work, f"train.init_from={champion}"), *TRACK]) == EXIT_OK
        assert read_json(work / "model" / "train_report.json")["warm_start"] is None
    assert main(["evaluate", "--quiet", *tiny(work), *TRACK]) == EXIT_OK  # promoted: warm starts from now on
    assert main(["train", "--quiet", "--force", *tiny(work, f"train.init_from={champion}"), *TRACK]) == EXIT_OK
    assert read_json(work / "model" / "train_report.json")["warm_start"] is not None


def test_a_registered_model_whose_files_are_gone_is_named_not_a_missing_model_pt(tmp_path, capsys):
    """The embedded store records absolute artifact paths: after the work directory moved, `--model
    models:/NAME/1` downloaded an empty directory and failed on "<tmp>/model.pt does not exist; write it with
    recsys.model.save_model"."""
    work, moved = tmp_path / "work", tmp_path / "moved"
    assert main(["features", "--quiet", *tiny(work)]) == EXIT_OK
    assert main(["train", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    work.rename(moved)
    capsys.readouterr()
    assert main(["candidates", "--quiet", "--date", "2024-05-01", "--model", "models:/gated/1", *tiny(moved),
                 *TRACK]) == 2
    err = capsys.readouterr().err
    assert "models:/gated/1 (version 1) came down without its model.pt" in err and "moved or mounted" in err, err
    run_id = read_json(moved / "model" / "train_report.json").get("run_id") or _run_of(moved)
    assert main(["candidates", "--quiet", "--date", "2024-05-01", "--model", f"runs:/{run_id}/model", *tiny(moved),
                 *TRACK]) == 2
    err = capsys.readouterr().err
    assert f"runs:/{run_id}/model could not be downloaded" in err and "moved or mounted" in err, err


def _run_of(work) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    return client.get_model_version("gated", "1").run_id


def test_a_champion_measured_with_another_exclude_seen_is_rescored_not_compared(tmp_path):
    """The recorded basis compared tonight's val NDCG@10 (seen items competing) with the champion's recorded one
    (seen items excluded, which scores higher): the new model was kept out on numbers that do not compare."""
    work = tmp_path / "work"
    assert main(["features", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    assert main(["train", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    assert main(["evaluate", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    assert read_json(work / "evaluation" / "promotion.json")["basis"] == "recorded"  # first model: nothing to rescore
    other = ("evaluate.exclude_seen=false", "train.max_epochs=3")
    assert main(["train", "--quiet", *tiny(work, *other), *TRACK]) == EXIT_OK
    assert main(["evaluate", "--quiet", *tiny(work, *other), *TRACK]) == EXIT_OK
    decision = read_json(work / "evaluation" / "promotion.json")
    assert (decision["version"], decision["champion_version"], decision["basis"]) == ("2", "1", "rescored")
    assert "rescored on tonight's" in decision["reason"]
    # both numbers are tonight's measurement with seen items competing: the challenger's equals its own recorded
    # one (same features, same setting), the champion's is not its recorded one (seen items excluded)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    v1 = client.get_run(client.get_model_version("gated", "1").run_id).data.metrics["best_val_ndcg_at_10"]
    v2 = read_json(work / "model" / "train_report.json")["best_val_ndcg_at_10"]
    assert decision["challenger_val_ndcg_at_10"] == pytest.approx(v2, abs=1e-6)
    assert decision["champion_val_ndcg_at_10"] < v1


def test_when_that_rescoring_fails_the_recorded_numbers_decide_with_a_warning(tmp_path, monkeypatch):
    """The fallback must not fail a night on the recorded basis, which never needed the champion's files."""
    import recsys.registry

    work = tmp_path / "work"
    assert main(["features", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    for extra in ((), ("evaluate.exclude_seen=false", "train.max_epochs=3")):
        assert main(["train", "--quiet", *tiny(work, *extra), *TRACK]) == EXIT_OK
        if extra:
            def gone(*args, **kwargs):
                raise RuntimeError("artifacts purged")

            monkeypatch.setattr(recsys.registry, "fetch_model", gone)
        assert main(["evaluate", "--quiet", *tiny(work, *extra), *TRACK]) == EXIT_OK
    decision = read_json(work / "evaluation" / "promotion.json")
    assert (decision["version"], decision["basis"]) == ("2", "recorded")
    logs = "".join(log.read_text() for log in (work / "logs").glob("evaluate-*.log"))
    assert "rescoring champion v1 failed (RuntimeError: artifacts purged); the recorded numbers decide" in logs


def test_a_champion_of_a_release_before_the_setting_counts_as_measured_without_seen_items(tmp_path, monkeypatch):
    """Releases before evaluate.exclude_seen always left seen items out; their train runs lack the param, which
    read as unknown, so such a champion was compared on numbers that do not compare."""
    from recsys.config import Config

    work = tmp_path / "work"
    assert main(["features", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    flat = Config.flat
    with monkeypatch.context() as old_release:
        old_release.setattr(Config, "flat", lambda self: {k: v for k, v in flat(self).items()
                                                          if k != "evaluate.exclude_seen"})
        assert main(["train", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    assert main(["evaluate", "--quiet", *tiny(work), *TRACK]) == EXIT_OK
    other = ("evaluate.exclude_seen=false", "train.max_epochs=3")
    assert main(["train", "--quiet", *tiny(work, *other), *TRACK]) == EXIT_OK
    assert main(["evaluate", "--quiet", *tiny(work, *other), *TRACK]) == EXIT_OK
    assert read_json(work / "evaluation" / "promotion.json")["basis"] == "rescored"


def test_a_tracking_server_outage_during_that_rescoring_is_the_gates_failure(tmp_path, monkeypatch):
    """Swallowed as 'rescoring failed', an outage let the gate decide on the recorded numbers and record it."""
    from types import SimpleNamespace

    from requests.exceptions import ConnectionError as Refused

    import recsys.registry
    from recsys.config import load_config

    def outage(*args, **kwargs):
        raise Refused("connection refused")

    monkeypatch.setattr(recsys.registry, "fetch_model", outage)
    tracker = SimpleNamespace(cfg=load_config(None, [f"work_dir={tmp_path}"]), uri="http://mlflow.example:5000")
    with pytest.raises(Refused):
        recsys.registry._rescored(tracker, "gated", "1", lambda files: None, ("true", "false"))

    def download_failed(*args, **kwargs):  # what the real fetch_model raises when the server drops mid-download
        try:
            raise Refused("connection refused")
        except Refused:
            raise FileNotFoundError("the files of models:/gated/1 could not be downloaded") from None

    monkeypatch.setattr(recsys.registry, "fetch_model", download_failed)
    with pytest.raises(FileNotFoundError):
        recsys.registry._rescored(tracker, "gated", "1", lambda files: None, ("true", "false"))
    monkeypatch.setattr(recsys.registry, "fetch_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("gone")))
    assert recsys.registry._rescored(tracker, "gated", "1", lambda files: None, ("true", "false")) is None
