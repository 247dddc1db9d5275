"""Every job, through the CLI, on synthetic data with a planted sequential pattern."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

from pipelines.cli import EXIT_OK, EXIT_USAGE, _summary, main
from recsys.config import load_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e") / "work"
    overrides = [
        f"work_dir={work}", "data.source=synthetic", "data.event_type_col=event_type",
        "data.synthetic.n_users=600", "data.synthetic.n_items=120", "data.synthetic.max_len=40",
        "features.min_user_events=5", "features.min_item_events=3",
        "model.max_len=30", "model.hidden=32", "train.max_epochs=25", "train.patience=4",
        "train.batch_size=64", "train.progress=false", "candidates.k=10", "candidates.recall_sample=100",
        "evaluate.history_segments=[10,20]",
    ]
    code = main(["run", "--quiet", *overrides])
    return code, work


def test_run_succeeds_and_writes_every_artifact(demo_run):
    code, work = demo_run
    assert code == EXIT_OK
    for rel in ("features/manifest.json", "features/sequences.parquet", "model/model.pt", "model/config.yaml",
                "evaluation/report.json", "evaluation/promotion.json"):
        assert (work / rel).is_file(), rel
    (night,) = (work / "candidates").glob("date=*")  # today's partition (UTC)
    for name in ("candidates.parquet", "manifest.json", "drift.json"):
        assert (night / name).is_file(), name


def test_model_beats_popularity_by_a_wide_margin(demo_run):
    _, work = demo_run
    report = json.loads((work / "evaluation" / "report.json").read_text())
    model, pop = report["model"]["ndcg_at_10"], report["popularity"]["ndcg_at_10"]
    assert model > 2 * pop and model - pop > 0.2, (model, pop)
    # The paired difference is the difference of the means, and its 95 % interval lies well above 0.
    gain, se = report["popularity"]["delta_ndcg_at_10"], report["popularity"]["delta_ndcg_at_10_se"]
    assert gain == pytest.approx(model - pop, abs=1e-9) and gain - 1.96 * se > 0.1
    assert 0 < se < report["model"]["ndcg_at_10_se"] + report["popularity"]["ndcg_at_10_se"]
    lines = _summary(load_config(overrides=[f"work_dir={work}"])).splitlines()
    row = next(line for line in lines if line.strip().startswith("ndcg_at_10 gain")).split()
    assert row[2:] == [f"{report[n]['delta_ndcg_at_10']:+.4f}" for n in ("popularity", "item_knn", "ease")]


def test_report_splits_every_scorer_by_history_length(demo_run):
    _, work = demo_run
    report = json.loads((work / "evaluation" / "report.json").read_text())
    for name in ("model", "popularity", "item_knn", "ease"):
        parts = report[name]["segments"]
        assert list(parts) == ["1-9", "10-19", "20+"]
        assert sum(p["n_users"] for p in parts.values()) == report[name]["n_users"]
        weighted = sum(p["ndcg_at_10"] * p["n_users"] for p in parts.values() if p["n_users"])
        assert weighted / report[name]["n_users"] == pytest.approx(report[name]["ndcg_at_10"], rel=1e-9)
    assert report["model"]["segments"]["20+"]["n_users"] > 0
    lines = _summary(load_config(overrides=[f"work_dir={work}"])).splitlines()
    assert "  ndcg_at_10 by history length (events before the target):" in lines
    row = next(line for line in lines if line.strip().startswith("10-19 ")).split()
    assert row[1:5] == [f"{report[n]['segments']['10-19']['ndcg_at_10']:.4f}"
                        for n in ("model", "popularity", "item_knn", "ease")]
    assert row[5] == f"({int(report['model']['segments']['10-19']['n_users'])}"


def test_manifest_accounts_for_every_row(demo_run):
    _, work = demo_run
    manifest = json.loads((work / "features" / "manifest.json").read_text())
    assert manifest["rows_in"] == manifest["rows_kept"] + sum(manifest["dropped"].values())
    assert manifest["dropped"].get("duplicate", 0) > 0  # the generator plants duplicates


def test_candidates_are_k_unseen_items_in_original_ids(demo_run):
    _, work = demo_run
    (night,) = (work / "candidates").glob("date=*")
    cands = pl.read_parquet(night / "candidates.parquet")
    item_map = pl.read_parquet(work / "features" / "item_map.parquet")
    events = pl.read_csv(work / "input" / "events.csv")
    assert cands.group_by("user_id").len()["len"].min() == 10
    assert set(cands["item_id"].unique().to_list()) <= set(item_map["item_id"].to_list())
    seen = cands.join(events.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="semi")
    kept_users = pl.read_parquet(work / "features" / "user_map.parquet")["user_id"]
    assert seen.filter(pl.col("user_id").is_in(kept_users.implode())).height == 0
    assert cands.group_by("user_id").agg(pl.col("score").diff().max())["score"].max() <= 0


def test_mlflow_has_a_run_per_job_and_a_registered_version(demo_run):
    _, work = demo_run
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("recsys")
    runs = client.search_runs([exp.experiment_id])
    jobs = sorted(r.data.tags["job"] for r in runs)
    assert jobs == ["candidates", "evaluate", "features", "train"]
    assert all(r.info.status == "FINISHED" for r in runs)
    train_run = next(r for r in runs if r.data.tags["job"] == "train")
    assert "val/ndcg_at_10" in train_run.data.metrics
    eval_run = next(r for r in runs if r.data.tags["job"] == "evaluate")
    report = json.loads((work / "evaluation" / "report.json").read_text())
    assert eval_run.data.metrics["test/model/history_10-19/ndcg_at_10"] == pytest.approx(
        report["model"]["segments"]["10-19"]["ndcg_at_10"])
    assert "test/ease/history_20_plus/delta_ndcg_at_10" in eval_run.data.metrics
    assert train_run.data.params["model.hidden"] == "32"
    versions = client.search_model_versions("name = 'sasrec'")
    assert len(versions) == 1 and versions[0].run_id == train_run.info.run_id
    aliases = client.get_registered_model("sasrec").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "1"}  # the first model


def test_missing_features_gives_a_clear_error(tmp_path, capsys):
    code = main(["train", f"work_dir={tmp_path}", "tracking.enabled=false"])
    assert code == EXIT_USAGE
    assert "recsys features" in capsys.readouterr().err


def test_an_option_its_mode_never_reads_is_a_warning_in_the_log(tmp_path, capsys):
    code = main(["train", f"work_dir={tmp_path}", "tracking.enabled=false", "train.mask_prob=0.4"])
    assert code == EXIT_USAGE  # no features: the job stops, after the warning
    assert "train.mask_prob=0.4 has no effect with model.attention=causal" in capsys.readouterr().err
    (log,) = (tmp_path / "logs").glob("train-*.log")
    assert "WARNING recsys.config: train.mask_prob=0.4 has no effect" in log.read_text()


def test_bad_config_key_exit_code(capsys):
    assert main(["run", "train.epochz=3"]) == EXIT_USAGE
    assert "train.epochz" in capsys.readouterr().err


def test_the_jobs_summary_says_when_the_evaluation_is_of_an_earlier_model(tmp_path):
    """After a night whose training succeeded and whose evaluation failed, every job's summary printed the
    previous model's table and gate as current; it says STALE, as `recsys status` does."""
    from recsys.config import load_config
    from recsys.storage import fingerprint

    work = tmp_path / "work"
    (work / "evaluation").mkdir(parents=True)
    (work / "model").mkdir()
    (work / "model" / "model.pt").write_bytes(b"tonight's weights")
    metrics = {"ndcg_at_10": 0.5, "hr_at_10": 0.6, "mrr_at_10": 0.4, "coverage_at_10": 0.1}
    report = {"split": "test", "ks": [10], "model": metrics, "model_version": "3",
              "model_weights_sha256": "0" * 64}
    (work / "evaluation" / "report.json").write_text(json.dumps(report))
    cfg = load_config(None, [f"work_dir={work}", "tracking.enabled=false"])
    assert "STALE: the evaluation and promotion above are of model version 3" in _summary(cfg)
    report["model_weights_sha256"] = fingerprint(work / "model" / "model.pt")["sha256"]
    (work / "evaluation" / "report.json").write_text(json.dumps(report))
    assert "STALE" not in _summary(cfg)


def test_status_reports_what_the_files_say_and_who_holds_a_lock(demo_run, capsys, tmp_path):
    from pipelines.schedule import job_lock

    _, work = demo_run
    capsys.readouterr()
    assert main(["status", f"work_dir={work}", "--json", "tracking.enabled=false"]) == EXIT_OK  # intermixed
    status = json.loads(capsys.readouterr().out)
    features = json.loads((work / "features" / "manifest.json").read_text())
    train = json.loads((work / "model" / "train_report.json").read_text())
    report = json.loads((work / "evaluation" / "report.json").read_text())
    (night,) = (work / "candidates").glob("date=*")
    manifest = json.loads((night / "manifest.json").read_text())
    assert status["runs"]["run"]["run_date"] == night.name.removeprefix("date=")  # today, UTC
    assert status["features"]["rows_in"] == features["rows_in"]
    assert status["features"]["newest_timestamp"] == features["newest_timestamp"]
    assert status["model"]["best_val_ndcg_at_10"] == train["best_val_ndcg_at_10"]
    assert status["evaluation"]["scores"] == {n: report[n]["ndcg_at_10"] for n in ("model", "popularity",
                                                                                    "item_knn", "ease")}
    latest = status["candidates"]["latest"]
    assert latest["date"] == night.name.removeprefix("date=") and latest["rows"] == manifest["rows"]
    assert latest["users"] == manifest["users"] and status["candidates"]["rejected"] == []
    assert latest["complete"] is True  # the whole night's completion marker
    assert status["running"] == {}
    with job_lock(work, "train"):  # held by this process: status names it
        assert main(["status", f"work_dir={work}"]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"running now: train (pid {os.getpid()} on {__import__('socket').gethostname()}, started " in text
    assert (f"best val NDCG@10 {train['best_val_ndcg_at_10']:.4f} at epoch {train['best_epoch'] + 1} of "
            f"{train['epochs_run']}") in text  # counted from 1, as epochs_run is (best_epoch is 0-based)
    assert main(["status", f"work_dir={tmp_path / 'nowhere'}"]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_status_writes_prometheus_gauges_that_say_what_the_files_say(demo_run, capsys, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.schedule import job_lock

    _, work = demo_run
    prom = tmp_path / "recsys.prom"
    with job_lock(work, "candidates.shard-0-of-2"):
        assert main(["status", "--prometheus", str(prom), f"work_dir={work}"]) == EXIT_OK
    assert "work directory:" in capsys.readouterr().out  # the usual text too
    samples = {}
    for family in text_string_to_metric_families(prom.read_text()):  # prometheus_client's own parser
        for s in family.samples:
            assert s.labels.pop("work_dir") == str(work.resolve())
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    features = json.loads((work / "features" / "manifest.json").read_text())
    train = json.loads((work / "model" / "train_report.json").read_text())
    report = json.loads((work / "evaluation" / "report.json").read_text())
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    (night,) = (work / "candidates").glob("date=*")
    manifest = json.loads((night / "manifest.json").read_text())
    marker = json.loads(next((work / "runs" / "run").glob("*.json")).read_text())
    from datetime import datetime
    assert samples[("recsys_last_success_timestamp_seconds", (("job", "run"),))] == pytest.approx(
        datetime.fromisoformat(marker["finished_at"]).timestamp())
    assert samples[("recsys_features_rows_kept", ())] == features["rows_kept"]
    assert samples[("recsys_features_newest_event_timestamp", ())] == features["newest_timestamp"]
    for reason, rows in features["dropped"].items():
        assert samples[("recsys_features_rows_dropped", (("reason", reason),))] == rows
    assert samples[("recsys_model_best_val_ndcg_at_10", ())] == pytest.approx(train["best_val_ndcg_at_10"])
    for scorer in ("model", "popularity", "item_knn", "ease"):
        key = ("recsys_evaluation_score", (("metric", "ndcg_at_10"), ("scorer", scorer), ("split", "test")))
        assert samples[key] == pytest.approx(report[scorer]["ndcg_at_10"])
    assert samples[("recsys_promotion_promoted", ())] == float(promotion["promoted"])
    assert samples[("recsys_candidates_latest_rows", ())] == manifest["rows"]
    assert samples[("recsys_candidates_latest_complete", ())] == 1.0
    assert samples[("recsys_candidates_nights_published", ())] == 1.0
    assert samples[("recsys_job_running", (("job", "candidates"),))] == 1.0  # a shard's lock counts
    assert samples[("recsys_job_running", (("job", "train"),))] == 0.0
    assert not list(tmp_path.glob("recsys.prom.*"))  # no temporary file left
    assert main(["status", "--prometheus", str(tmp_path / "no" / "dir" / "x.prom"), f"work_dir={work}"]) == EXIT_USAGE
    assert "x.prom" in capsys.readouterr().err


def test_evaluate_with_seen_items_competing_and_the_repeat_baseline(demo_run, tmp_path):
    import shutil

    _, work = demo_run
    copy = tmp_path / "work"
    for name in ("features", "model"):
        shutil.copytree(work / name, copy / name)
    overrides = [f"work_dir={copy}", "evaluate.exclude_seen=false", "evaluate.baselines=[popularity,repeat]",
                 "evaluate.history_segments=[]", "tracking.enabled=false"]
    assert main(["evaluate", "--quiet", *overrides]) == EXIT_OK
    report = json.loads((copy / "evaluation" / "report.json").read_text())
    standard = json.loads((work / "evaluation" / "report.json").read_text())
    assert report["exclude_seen"] is False and standard["exclude_seen"] is True
    assert list(k for k in report if isinstance(report[k], dict)) == ["model", "popularity", "repeat"]
    # seen items competing add competitors: no target can rank higher than with them excluded
    assert report["model"]["ndcg_at_10"] <= standard["model"]["ndcg_at_10"]
    assert report["model"]["n_users"] == standard["model"]["n_users"]
    lines = _summary(load_config(overrides=overrides)).splitlines()
    assert "evaluation (test split, full catalogue, seen items competing):" in lines


def test_repeat_bias_model_through_train_evaluate_and_candidates(demo_run, tmp_path):
    import shutil

    import torch

    from recsys.candidates import load_trained_model

    _, work = demo_run
    copy = tmp_path / "work"
    shutil.copytree(work / "features", copy / "features")
    overrides = [f"work_dir={copy}", "model.repeat_bias=true", "model.max_len=30", "model.hidden=32",
                 "train.max_epochs=3", "train.progress=false", "evaluate.exclude_seen=false",
                 "evaluate.baselines=[repeat]", "evaluate.history_segments=[]", "candidates.exclude_seen=false",
                 "candidates.k=10", "candidates.recall_sample=50", "tracking.enabled=false"]
    for job in ("train", "evaluate"):
        assert main([job, "--quiet", *overrides]) == EXIT_OK, job
    assert main(["candidates", "--quiet", "--date", "2024-09-01", *overrides]) == EXIT_OK
    trained = load_trained_model(copy / "model")
    assert trained.model.repeat_bias and bool(trained.model.repeat_weight.abs().sum() > 0)  # it trained
    report = json.loads((copy / "evaluation" / "report.json").read_text())
    assert report["exclude_seen"] is False and 0.0 < report["model"]["ndcg_at_10"] <= 1.0
    # the candidates are the model's exact scores (Flat index) with the bonus, seen items included
    lists = pl.read_parquet(copy / "candidates" / "date=2024-09-01" / "candidates.parquet")
    seq = pl.read_parquet(copy / "features" / "sequences.parquet").join(
        pl.read_parquet(copy / "features" / "user_map.parquet"), on="user_idx").sort("user_id").head(5)
    to_id = dict(zip(trained.item_map["item_idx"], trained.item_map["item_id"], strict=True))
    for user, t, v, s in zip(seq["user_id"], seq["train_items"], seq["val_items"], seq["test_items"], strict=True):
        history = (t.to_list() + v.to_list() + s.to_list())[-30:]
        with torch.no_grad():
            scores = trained.model.scores(torch.tensor([[0] * (30 - len(history)) + history]))[0, 1:]
        want = [to_id[int(i) + 1] for i in scores.argsort(descending=True, stable=True)[:10]]
        assert lists.filter(pl.col("user_id") == user).sort("rank")["item_id"].to_list() == want


def test_a_stale_evaluation_of_an_unregistered_model_says_so():
    """With tracking off the earlier model has no version: the warning said "model version None"."""
    from pipelines.status import stale_warning

    assert stale_warning({"model_version": "3"}).startswith("the evaluation and promotion above are of model version 3,")
    assert stale_warning({"model_version": None}).startswith(
        "the evaluation and promotion above are of an earlier model (not registered), not of the model in model/ now")
