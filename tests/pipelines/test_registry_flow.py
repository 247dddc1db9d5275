"""Through a real MLflow server: train → register → promotion gate → nightly candidates from
``models:/<name>@champion`` in another work directory whose features are NEWER than the model → rollback.

Tests run in file order and build on each other (one server, one registered model).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient

from pipelines.cli import EXIT_OK, main
from recsys import storage
from recsys.storage import fingerprint, read_json
from tests.pipelines.conftest import tiny

NAME = "sasrec-flow"
CHAMPION_URI = f"models:/{NAME}@champion"


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([args[0], "--quiet", *args[1:]])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def flow(mlflow_server, tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> dict:
    """Work dir ``train`` (trains and evaluates v1) and work dir ``nightly`` (newer features, no model)."""
    root = tmp_path_factory.mktemp("registry-flow")
    track = [f"tracking.uri={mlflow_server.url}", "tracking.enabled=true",
             f"tracking.registered_model={NAME}"]
    train = root / "train"
    shutil.copytree(tiny_features, train / "features")
    assert _cli("train", *tiny(train), *track)[0] == EXIT_OK
    code, summary = _cli("evaluate", *tiny(train), *track)
    assert code == EXIT_OK

    # Newer events: user 9001 (new) with known items, user 9002 with only new items 99991 and 99992, user 1
    # with one more event, of new item 99991.
    events = pl.read_csv(tiny_features.parent / "input" / "events.csv")
    known = events.filter(pl.col("user_id") == 2)["item_id"].to_list()[:4]
    t0 = events["timestamp"].max() + 1
    extra = pl.DataFrame(
        {"user_id": [9001] * 4 + [9002, 9002, 1], "item_id": [*known, 99991, 99992, 99991],
         "timestamp": list(range(t0, t0 + 7))},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
    )
    nightly = root / "nightly"
    (nightly / "input").mkdir(parents=True)
    pl.concat([events.select(extra.columns), extra]).write_csv(nightly / "input" / "events.csv")
    newer = [*tiny(nightly), "data.source=file", f"data.path={nightly / 'input' / 'events.csv'}"]
    assert _cli("features", *newer)[0] == EXIT_OK
    return {"train": train, "nightly": nightly, "track": track, "newer": newer, "summary": summary,
            "client": MlflowClient(tracking_uri=mlflow_server.url)}


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str, list[str]]]:
    """Where the jobs download a registered model to: (parent, name, files downloaded) of each scratch_dir."""
    seen: list[tuple[Path, str, list[str]]] = []

    @contextlib.contextmanager
    def spy(parent, name):
        with storage.scratch_dir(parent, name) as path:
            yield path
            seen.append((Path(parent), name, sorted(p.name for p in path.rglob("*.pt"))))

    import pipelines.generate_candidates
    import pipelines.train
    import recsys.registry

    for module in (pipelines.train, pipelines.generate_candidates, recsys.registry):
        monkeypatch.setattr(module, "scratch_dir", spy)
    return seen


def _nightly(flow: dict, date: str, *extra: str) -> tuple[int, Path]:
    code, _ = _cli("candidates", "--date", date, *flow["newer"], *flow["track"], *extra)
    return code, flow["nightly"] / "candidates" / f"date={date}"


def test_first_version_is_promoted_and_the_decision_logged(flow):
    client = flow["client"]
    assert client.get_registered_model(NAME).aliases == {"champion": "1", "challenger": "1"}
    ndcg = read_json(flow["train"] / "model" / "train_report.json")["best_val_ndcg_at_10"]
    tags = client.get_model_version(NAME, "1").tags
    assert tags["promotion.promoted"] == "true" and "first model" in tags["promotion.reason"]
    assert float(tags["val_ndcg_at_10"]) == pytest.approx(ndcg)
    run = client.get_run(tags["promotion.run_id"])
    assert run.data.tags["job"] == "evaluate" and run.data.tags["promotion.version"] == "1"
    assert run.data.metrics["promotion/promoted"] == 1.0
    assert run.data.metrics["promotion/challenger_val_ndcg_at_10"] == pytest.approx(ndcg)
    assert f"promotion gate: {NAME} v1 promoted to champion" in flow["summary"]


def test_a_failing_gate_leaves_the_previous_evaluation_whole(flow, monkeypatch):
    """The gate fails after the metrics are computed (MLflow, a champion that cannot be re-scored): the job
    fails and evaluation/ keeps its previous report with its promotion.json (before: a new report.json with
    the old promotion.json gone)."""
    import pipelines.evaluate

    evaluation = flow["train"] / "evaluation"
    before = {p.name: p.read_bytes() for p in sorted(evaluation.iterdir())}
    assert {"report.json", "promotion.json"} <= set(before)

    def broken(*args, **kwargs):
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(pipelines.evaluate, "promote", broken)
    code, _ = _cli("evaluate", *tiny(flow["train"]), *flow["track"], "evaluate.ks=[5]")
    assert code != EXIT_OK
    assert {p.name: p.read_bytes() for p in sorted(evaluation.iterdir())} == before


def test_train_and_evaluate_runs_record_the_same_features_build_as_input(flow):
    client = flow["client"]
    version = client.get_model_version(NAME, "1")
    runs = {"training": client.get_run(version.run_id),
            "evaluation": client.get_run(version.tags["promotion.run_id"])}
    manifest = flow["train"] / "features" / "manifest.json"
    digest = fingerprint(manifest)["sha256"][:36]
    rows = pl.read_parquet(flow["train"] / "features" / "sequences.parquet").height
    for context, run in runs.items():
        (used,) = run.inputs.dataset_inputs
        assert used.dataset.name == "features" and used.dataset.digest == digest
        assert json.loads(used.dataset.source) == {"uri": (flow["train"] / "features").resolve().as_uri()}
        assert json.loads(used.dataset.profile)["num_rows"] == rows
        assert {t.key: t.value for t in used.tags}["mlflow.data.context"] == context


def test_candidates_from_the_champion_map_ids_through_the_models_maps(flow, mlflow_server):
    assert not (flow["nightly"] / "model").exists()  # the only model is the registry's
    code, night = _nightly(flow, "2024-05-01", "--model", CHAMPION_URI)
    assert code == EXIT_OK
    manifest = json.loads((night / "manifest.json").read_text())
    version = flow["client"].get_model_version(NAME, "1")
    weights = fingerprint(flow["train"] / "model" / "model.pt")["sha256"]  # v1's, downloaded from the registry
    assert manifest["model"] == {"uri": CHAMPION_URI, "name": NAME, "version": "1", "alias": "champion",
                                 "run_id": version.run_id, "weights_sha256": weights}
    table = pl.read_parquet(night / "candidates.parquet")
    model_items = pl.read_parquet(flow["train"] / "model" / "item_map.parquet")
    assert set(table["item_id"].to_list()) <= set(model_items["item_id"].to_list())  # never 99991/99992
    assert manifest["unknown_items"] == 2 and manifest["unknown_item_events"] == 3
    assert manifest["users_unknown_to_model"] == 2 and manifest["fallback_users"] == 1
    popular = model_items.sort(["train_count", "item_id"], descending=[True, False])["item_id"].head(5)
    assert table.filter(pl.col("user_id") == 9002)["item_id"].to_list() == popular.to_list()
    assert table.filter(pl.col("user_id") == 9001).height == 5  # scored from its history by the model
    assert manifest["users"] == table["user_id"].n_unique() == 202
    # The registered version is an MLflow pyfunc model: it gives user 9001 the same list from the same history.
    import mlflow.pyfunc
    import pandas as pd

    history = pl.read_csv(flow["nightly"] / "input" / "events.csv").filter(pl.col("user_id") == 9001)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        served = mlflow.pyfunc.load_model(CHAMPION_URI).predict(
            pd.DataFrame({"history": [history["item_id"].to_list()]}), params={"k": 5})
    finally:
        mlflow.set_tracking_uri(before)
    assert list(served["item_ids"][0]) == table.filter(pl.col("user_id") == 9001)["item_id"].to_list()


def test_rerun_of_a_night_replaces_it_with_identical_output(flow):
    night = flow["nightly"] / "candidates" / "date=2024-05-01"
    before = {p.name: p.read_bytes() for p in night.iterdir()}
    table = pl.read_parquet(night / "candidates.parquet")
    code, night = _nightly(flow, "2024-05-01", "--model", CHAMPION_URI)
    assert code == EXIT_OK
    assert pl.read_parquet(night / "candidates.parquet").equals(table)
    assert {p.name: p.read_bytes() for p in night.iterdir()} == before  # every file, byte for byte


def test_second_version_goes_through_the_gate(flow):
    train, client = flow["train"], flow["client"]
    v1 = read_json(train / "model" / "train_report.json")["best_val_ndcg_at_10"]
    # A barely trained second model: whatever its score, the decision must follow the rule.
    assert _cli("train", *tiny(train), *flow["track"], "train.max_epochs=1", "train.lr=1e-5")[0] == EXIT_OK
    code, summary = _cli("evaluate", *tiny(train), *flow["track"])
    assert code == EXIT_OK
    v2 = read_json(train / "model" / "train_report.json")["best_val_ndcg_at_10"]
    promoted = v2 >= v1
    aliases = client.get_registered_model(NAME).aliases
    assert aliases == {"challenger": "2", "champion": "2" if promoted else "1"}
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.promoted"] == str(promoted).lower() and tags["promotion.champion_version"] == "1"
    assert float(tags["promotion.champion_val_ndcg_at_10"]) == pytest.approx(v1)
    assert float(tags["val_ndcg_at_10"]) == pytest.approx(v2)
    verdict = "promoted to champion" if promoted else "stays challenger"
    assert f"{NAME} v2 {verdict}" in summary


def test_next_night_reports_drift_and_rollback_restores_the_old_lists(flow, mlflow_server, downloads):
    client = flow["client"]
    code, night2 = _nightly(flow, "2024-05-02", "--model", f"models:/{NAME}/2")
    assert code == EXIT_OK
    # the registered model is downloaded into the work directory (swept there), not /tmp (swept never)
    assert downloads == [(flow["nightly"], "scored-model", ["model.pt"])]
    assert not list(flow["nightly"].glob(".scored-model*"))
    drift = json.loads((night2 / "drift.json").read_text())
    assert drift["previous"].endswith("date=2024-05-01") and drift["users_common"] == 202
    assert 0.0 <= drift["mean_overlap_at_k"] <= 1.0 and drift["users_lost"] == drift["users_gained"] == 0
    experiment = client.get_experiment_by_name("recsys").experiment_id
    night = "tags.job = 'candidates' and tags.`candidates.date` = '2024-05-02'"
    (run,) = client.search_runs([experiment], night)
    assert run.data.metrics["drift/mean_overlap_at_k"] == pytest.approx(drift["mean_overlap_at_k"])

    client.set_registered_model_alias(NAME, "champion", "1")  # the documented rollback
    code, night3 = _nightly(flow, "2024-05-03", "--model", CHAMPION_URI)
    assert code == EXIT_OK
    assert json.loads((night3 / "manifest.json").read_text())["model"]["version"] == "1"
    first = pl.read_parquet(flow["nightly"] / "candidates" / "date=2024-05-01" / "candidates.parquet")
    assert pl.read_parquet(night3 / "candidates.parquet").equals(first)


def test_nightly_training_warm_starts_from_the_champion(flow, downloads):
    # After the rollback the champion is v1; the nightly features hold two items it never saw.
    nightly, client = flow["nightly"], flow["client"]
    code, _ = _cli("train", *flow["newer"], *flow["track"], f"train.init_from={CHAMPION_URI}",
                   "train.max_epochs=1", "train.lr=1e-12")
    assert code == EXIT_OK
    assert downloads == [(nightly, "init-model", ["model.pt"])] and not list(nightly.glob(".init-model*"))
    report = read_json(nightly / "model" / "train_report.json")
    v1 = client.get_model_version(NAME, "1")
    model_items = pl.read_parquet(flow["train"] / "model" / "item_map.parquet").height
    assert report["warm_start"] == {"uri": CHAMPION_URI, "name": NAME, "version": "1", "alias": "champion",
                                    "run_id": v1.run_id, "items_from_source": model_items, "items_new": 2,
                                    "source_items_dropped": 0, "shrink": 1.0, "perturb": 0.0}
    assert report["n_items"] == model_items + 2
    # Its run logged the counts; the champion did not move (this job trains and registers, nothing else).
    run = client.get_run(client.get_model_version(NAME, report["registered_version"]).run_id)
    assert run.data.metrics["warm_start/items_new"] == 2.0
    assert client.get_registered_model(NAME).aliases["champion"] == "1"


def test_rescored_gate_scores_the_champion_on_tonights_users(flow, mlflow_server, tmp_path, downloads):
    # The nightly model (trained by the test above, not yet gated) against champion v1, both scored on the
    # nightly validation users: v1 never saw items 99991 / 99992.
    nightly, client = flow["nightly"], flow["client"]
    version = read_json(nightly / "model" / "train_report.json")["registered_version"]
    code, summary = _cli("evaluate", *flow["newer"], *flow["track"], "tracking.promotion_basis=rescored")
    assert code == EXIT_OK
    assert downloads == [(nightly, "champion-model", ["model.pt"])] and not list(nightly.glob(".champion-model*"))
    decision = read_json(nightly / "evaluation" / "promotion.json")
    assert decision["basis"] == "rescored" and decision["version"] == version
    assert decision["champion_version"] == "1"
    # Oracle: the same comparison made here from v1's registered files and the nightly files.
    import mlflow.artifacts

    from features.artifacts import load_features
    from recsys.candidates import load_trained_model
    from recsys.comparison import compare_on_validation
    from recsys.model import load_model

    v1_dir = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp_path),
                                                 tracking_uri=mlflow_server.url)
    feats, model = load_features(nightly / "features"), load_model(nightly / "model")
    want = compare_on_validation(model, load_trained_model(v1_dir), feats.sequences, feats.item_map,
                                 model.max_len)
    assert decision["comparison"] == pytest.approx(want.to_dict())
    # User 9002 (only items v1 never saw) has 2 events, so no validation target: not among the counted.
    assert decision["comparison"]["users_without_known_history"] == 0
    assert decision["comparison"]["users_compared"] > 0
    assert decision["challenger_val_ndcg_at_10"] == pytest.approx(want.challenger)
    assert decision["champion_val_ndcg_at_10"] == pytest.approx(want.champion)
    promoted = want.challenger >= want.champion
    assert decision["promoted"] == promoted and "rescored on tonight's" in decision["reason"]
    assert client.get_registered_model(NAME).aliases["champion"] == (version if promoted else "1")
    assert client.get_model_version(NAME, version).tags["promotion.basis"] == "rescored"
