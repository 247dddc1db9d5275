"""The registry in states a team's MLflow store reaches: a deleted experiment, a deleted model version, a
champion whose train run was garbage-collected, an alias that does not exist, a manual rollback followed by a
retried night. Each used to fail every later night with exit 1 and a traceback, or undo the rollback.

A local SQLite store (tracking.enabled=true, no tracking.uri): the same MLflow client calls as a server's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from tests.pipelines.conftest import tiny

DAY, NEXT = "2024-05-01", "2024-05-02"
TRACK = ["tracking.enabled=true"]


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    """A work directory after the first night (`recsys run`): version 1 registered and champion."""
    work = tmp_path_factory.mktemp("registry-states") / "work"
    shutil.copytree(tiny_features, work / "features")
    assert main(["run", "--quiet", "--run-date", DAY, *tiny(work, *TRACK)]) == EXIT_OK
    return work


def _copy(night: Path, tmp_path: Path) -> tuple[Path, MlflowClient]:
    work = tmp_path / "work"
    shutil.copytree(night, work)
    return work, MlflowClient(f"sqlite:///{work / 'mlflow.db'}")


def test_a_deleted_experiment_is_a_config_error_naming_the_restore_command(night, tmp_path, capsys):
    work, client = _copy(night, tmp_path)
    experiment = client.get_experiment_by_name("recsys")
    client.delete_experiment(experiment.experiment_id)
    assert main(["evaluate", "--quiet", *tiny(work, *TRACK)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"mlflow experiments restore --experiment-id {experiment.experiment_id}" in err
    assert "tracking.experiment" in err and "Traceback" not in err


def test_candidates_of_a_version_deleted_from_the_registry_record_no_run_id(night, tmp_path):
    work, client = _copy(night, tmp_path)
    client.delete_model_version("sasrec", "1")
    assert main(["candidates", "--quiet", "--date", NEXT, *tiny(work, *TRACK)]) == EXIT_OK
    manifest = json.loads((work / "candidates" / f"date={NEXT}" / "manifest.json").read_text())
    assert manifest["model"]["version"] == "1" and manifest["model"]["run_id"] is None


@pytest.mark.parametrize("model, tracking, needle", [
    ("models:/sasrec@nosuch", True, "no such model version"),
    ("models:/other@champion", True, "no such model version"),
    ("models:/sasrec/latest", True, "expected models:/<name>@<alias>"),
    ("models:/sasrec@champion", False, "tracking is disabled"),
])
def test_a_model_uri_the_registry_cannot_resolve_is_exit_2(night, tmp_path, capsys, model, tracking, needle):
    work, _ = _copy(night, tmp_path)
    args = ["candidates", "--quiet", "--date", NEXT, "--model", model,
            *tiny(work, f"tracking.enabled={str(tracking).lower()}")]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_the_gate_reads_a_gone_champion_runs_tag_and_a_retry_keeps_a_rollback(night, tmp_path):
    """Night 2 after `mlflow gc` removed v1's train run: the recorded gate takes v1's val_ndcg_at_10 tag
    (it crashed on the missing run every night). v2 is promoted (tolerance 1), an operator rolls back to v1,
    and the retried evaluation of v2 leaves v1 champion and v2's recorded decision as they were."""
    work, client = _copy(night, tmp_path)
    v1 = client.get_model_version("sasrec", "1")
    recorded = float(v1.tags["val_ndcg_at_10"])
    client.delete_run(v1.run_id)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--tracking-uri", uri,
                    "--run-ids", v1.run_id], check=True, capture_output=True)
    second = tiny(work, *TRACK, "train.max_epochs=3", "tracking.promotion_tolerance=1")
    assert main(["run", "--quiet", "--run-date", NEXT, *second]) == EXIT_OK
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    assert (promotion["version"], promotion["promoted"], promotion["champion_version"]) == ("2", True, "1")
    assert promotion["champion_val_ndcg_at_10"] == pytest.approx(recorded)
    decided = client.get_model_version("sasrec", "2").tags
    client.set_registered_model_alias("sasrec", "champion", "1")  # the rollback
    assert main(["evaluate", "--quiet", *second]) == EXIT_OK  # a retried night
    aliases = client.get_registered_model("sasrec").aliases
    assert (str(aliases["champion"]), str(aliases["challenger"])) == ("1", "2")
    retried = json.loads((work / "evaluation" / "promotion.json").read_text())
    assert retried["promoted"] is False and "rolled back" in retried["reason"]
    assert client.get_model_version("sasrec", "2").tags == decided  # its first decision stays recorded


def test_a_gate_cut_off_before_its_alias_move_is_gated_again_not_taken_for_a_rollback(night, tmp_path, monkeypatch):
    """The decision is tagged on the version before the aliases move. A server lost in between left v2 tagged
    promoted with v1 still champion; promotion.json said "not run: rerun recsys evaluate", and the rerun took v2
    for a version an operator had rolled back: it stayed challenger for good."""
    from mlflow.exceptions import MlflowException

    import recsys.tracking

    work, client = _copy(night, tmp_path)
    second = tiny(work, *TRACK, "train.max_epochs=3", "tracking.promotion_tolerance=1")
    assert main(["train", "--quiet", "--run-date", NEXT, *second]) == EXIT_OK  # v2
    monkeypatch.setattr(recsys.tracking, "_server_failure", lambda uri, exc: isinstance(exc, MlflowException))

    def dead(self, *args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/registered-models/alias failed: refused")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", dead)
        assert main(["evaluate", "--quiet", *second]) != EXIT_OK
    assert json.loads((work / "evaluation" / "promotion.json").read_text())["summary"].startswith("not run")
    assert client.get_model_version("sasrec", "2").tags["promotion.applied"] == "false"
    assert str(client.get_registered_model("sasrec").aliases["champion"]) == "1"
    assert main(["evaluate", "--quiet", *second]) == EXIT_OK  # the server back: the rerun promotion.json asks for
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    assert promotion["promoted"] is True and "rolled back" not in promotion["reason"]
    assert str(client.get_registered_model("sasrec").aliases["champion"]) == "2"
    assert client.get_model_version("sasrec", "2").tags["promotion.applied"] == "true"


def test_status_flags_an_evaluation_of_an_earlier_model(night, tmp_path, capsys):
    """A night whose training succeeded and whose evaluation failed leaves last night's report and promotion
    beside tonight's model: status and the gauges say so (they showed v1's scores next to v2, no warning)."""
    work, _ = _copy(night, tmp_path)
    capsys.readouterr()  # what the night printed
    assert main(["status", "--json", *tiny(work, *TRACK)]) == EXIT_OK
    before = json.loads(capsys.readouterr().out)["evaluation"]
    assert before["of_current_model"] is True and before["model_version"] == "1"
    assert main(["train", "--quiet", *tiny(work, *TRACK, "train.max_epochs=2")]) == EXIT_OK  # no evaluate after
    capsys.readouterr()
    assert main(["status", *tiny(work, *TRACK)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "STALE:" in text and "of model version 1, not of the model in model/ now" in text
    prom = tmp_path / "status.prom"
    assert main(["status", "--prometheus", str(prom), *tiny(work, *TRACK)]) == EXIT_OK
    assert "recsys_evaluation_of_current_model{" in prom.read_text()
    line = next(x for x in prom.read_text().splitlines() if x.startswith("recsys_evaluation_of_current_model{"))
    assert line.endswith(" 0.0")
    # a report of an older release, without the weights' SHA-256: told by registered version (was null, so the
    # gauge was absent and its `== 0` alert silent)
    report = work / "evaluation" / "report.json"
    fields = json.loads(report.read_text())
    report.write_text(json.dumps({k: v for k, v in fields.items() if k != "model_weights_sha256"}))
    capsys.readouterr()
    assert main(["status", "--json", *tiny(work, *TRACK)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["evaluation"]["of_current_model"] is False
    assert main(["evaluate", "--quiet", *tiny(work, *TRACK)]) == EXIT_OK
    capsys.readouterr()
    assert main(["status", "--json", *tiny(work, *TRACK)]) == EXIT_OK
    after = json.loads(capsys.readouterr().out)["evaluation"]
    assert after["of_current_model"] is True and after["model_version"] == "2"


def test_versions_kept_out_in_a_row_are_counted_and_warned_about(night, tmp_path):
    """Three barely trained versions (other seeds: other weights, so new versions) against v1: each stays
    challenger; promotion.json and the gauge count them, and the third gets the warning that recorded numbers
    from other data may not compare (the recorded gate could keep a stale champion forever, silently)."""
    work, client = _copy(night, tmp_path)
    weak = ["train.max_epochs=1", "train.lr=1e-5"]
    for n, seed in enumerate((11, 12, 13), start=1):
        args = tiny(work, *TRACK, *weak, f"train.seed={seed}")
        assert main(["train", "--quiet", *args]) == EXIT_OK
        assert main(["evaluate", "--quiet", *args]) == EXIT_OK
        promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
        assert (promotion["version"], promotion["promoted"]) == (str(n + 1), False)
        assert promotion["kept_out_in_a_row"] == n
        log = max((work / "logs").glob("evaluate-*.log"), key=lambda p: p.stat().st_mtime_ns).read_text()
        assert ("3. version in a row kept out against champion v1" in log) == (n == 3)
    prom = tmp_path / "status.prom"
    assert main(["status", "--prometheus", str(prom), *tiny(work, *TRACK)]) == EXIT_OK
    assert any(x.startswith("recsys_promotion_kept_out_in_a_row{") and x.endswith(" 3.0")
               for x in prom.read_text().splitlines())
    assert str(client.get_registered_model("sasrec").aliases["champion"]) == "1"


def test_a_gate_cut_off_after_its_alias_move_is_completed_by_the_retry_so_a_rollback_stays(
    night, tmp_path, monkeypatch
):
    """The server lost between the champion alias move and the tag promotion.applied=true: the retry ("already
    the champion") never wrote the tag, so after an operator's rollback a retried night gated the version again
    and moved the champion alias back to it."""
    from mlflow.exceptions import MlflowException

    import recsys.tracking

    work, client = _copy(night, tmp_path)
    second = tiny(work, *TRACK, "train.max_epochs=3", "tracking.promotion_tolerance=1")
    assert main(["train", "--quiet", "--run-date", NEXT, *second]) == EXIT_OK  # v2
    monkeypatch.setattr(recsys.tracking, "_server_failure", lambda uri, exc: isinstance(exc, MlflowException))
    tag = MlflowClient.set_model_version_tag

    def lost_on_applied(self, name, version, key, value):
        if key == "promotion.applied" and value == "true":
            raise MlflowException("API request to endpoint /api/2.0/mlflow/model-versions/set-tag failed: 503")
        return tag(self, name, version, key, value)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", lost_on_applied)
        assert main(["evaluate", "--quiet", *second]) != EXIT_OK
    assert str(client.get_registered_model("sasrec").aliases["champion"]) == "2"
    assert client.get_model_version("sasrec", "2").tags["promotion.applied"] == "false"
    assert main(["evaluate", "--quiet", *second]) == EXIT_OK  # the retry
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    assert promotion["reason"].startswith("already the champion") and promotion["champion_version"] == "1"
    assert client.get_model_version("sasrec", "2").tags["promotion.applied"] == "true"
    client.set_registered_model_alias("sasrec", "champion", "1")  # an operator rolls v2 back
    assert main(["evaluate", "--quiet", *second]) == EXIT_OK  # a retried night
    promotion = json.loads((work / "evaluation" / "promotion.json").read_text())
    assert promotion["promoted"] is False and "since rolled back" in promotion["reason"]
    assert str(client.get_registered_model("sasrec").aliases["champion"]) == "1"


@pytest.mark.parametrize("old_report", [False, True])
def test_a_model_registered_under_another_name_is_not_gated_as_this_ones_version(night, tmp_path, capsys,
                                                                                   old_report):
    """Two configs sharing one work directory: `other` trained last, so model/ is version 1 of `other`; an
    evaluate under `sasrec` gated `sasrec` v1 (another model) with the new model's numbers and reported it as
    promoted. Caught by the name the train report records, and for reports without it (written before it was
    recorded) by the version's content tag."""
    work, client = _copy(night, tmp_path)
    assert main(["train", "--quiet", "--force", *tiny(work, *TRACK, "tracking.registered_model=other",
                                                     "train.seed=7")]) == EXIT_OK
    report = work / "model" / "train_report.json"
    if old_report:
        fields = json.loads(report.read_text())
        report.write_text(json.dumps({k: v for k, v in fields.items()
                                      if k not in ("registered_model", "tracking_uri", "content_sha256")}))
    before = (work / "evaluation" / "promotion.json").read_bytes()
    tags = client.get_model_version("sasrec", "1").tags
    capsys.readouterr()
    assert main(["evaluate", "--quiet", *tiny(work, *TRACK)]) == EXIT_USAGE
    err = capsys.readouterr().err
    says = "holds other files (content_sha256" if old_report else "was registered as version 1 of 'other'"
    assert says in err and "nothing was gated" in err and "Traceback" not in err, err
    assert (work / "evaluation" / "promotion.json").read_bytes() == before
    assert client.get_model_version("sasrec", "1").tags == tags
    assert main(["evaluate", "--quiet", *tiny(work, *TRACK, "tracking.registered_model=other")]) == EXIT_OK
    assert json.loads((work / "evaluation" / "promotion.json").read_text())["model"] == "other"
    if not old_report:  # candidates of model/ record it as the model it was registered as, with that run
        assert main(["candidates", "--quiet", "--date", NEXT, *tiny(work, *TRACK)]) == EXIT_OK
        manifest = json.loads((work / "candidates" / f"date={NEXT}" / "manifest.json").read_text())
        assert (manifest["model"]["name"], manifest["model"]["version"]) == ("other", "1")
        assert manifest["model"]["run_id"] == client.get_model_version("other", "1").run_id


def test_evaluating_a_model_whose_version_was_deleted_is_exit_2(night, tmp_path, capsys):
    work, client = _copy(night, tmp_path)
    client.delete_model_version("sasrec", "1")
    capsys.readouterr()
    assert main(["evaluate", "--quiet", *tiny(work, *TRACK)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "version 1 of tracking.registered_model 'sasrec'" in err and "does not exist (deleted from the " \
        "registry since?)" in err and "Traceback" not in err, err


def test_a_night_split_by_an_older_release_is_finished_by_this_one(night, tmp_path, capsys):
    """Shard 0 written before manifests recorded the weights' SHA-256: shard 1 was refused as 'another model'
    (None against a hash) after an upgrade; the registered version and its run name the model then."""
    work, _ = _copy(night, tmp_path)
    assert main(["candidates", "--quiet", "--date", NEXT, "--shard", "0/2", *tiny(work, *TRACK)]) == EXIT_OK
    path = work / "candidates" / "shard=0-of-2" / f"date={NEXT}" / "manifest.json"
    old = json.loads(path.read_text())
    del old["model"]["weights_sha256"]
    path.write_text(json.dumps(old))
    assert main(["candidates", "--quiet", "--date", NEXT, "--shard", "1/2", *tiny(work, *TRACK)]) == EXIT_OK
    old["model"]["version"] = "7"  # another version: refused, saying why
    path.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(["candidates", "--quiet", "--date", NEXT, "--shard", "1/2", *tiny(work, *TRACK)]) == EXIT_USAGE
    assert "recorded without its weights' SHA-256 by an older release" in capsys.readouterr().err
