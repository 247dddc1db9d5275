"""Registering into a registered model that another job created between our look-up and our create."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import load_config
from recsys.tracking import job_run


def test_a_registered_model_created_meanwhile_is_registered_into_not_a_failure(tmp_path: Path, monkeypatch) -> None:
    """Two jobs registering the first version at once (shards, a rerun), or a retried create whose first reply
    was lost: the second create answers RESOURCE_ALREADY_EXISTS, which failed the job after its work was done."""
    from mlflow import MlflowClient

    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "tracking.enabled=true",
                             "tracking.registered_model=sasrec-race"])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    with job_run(cfg, "train") as run:
        import mlflow

        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        client = MlflowClient()
        client.create_registered_model("sasrec-race")  # the other job's, after our look-up saw none
        monkeypatch.setattr(MlflowClient, "search_registered_models", lambda self, **kw: [])
        version = run.register_model("model", digest="ab" * 32)
    assert version == "1"
    versions = MlflowClient(tracking_uri=run.uri).search_model_versions("name = 'sasrec-race'")
    assert [(str(mv.version), mv.tags["content_sha256"]) for mv in versions] == [("1", "ab" * 32)]


def test_other_refusals_of_the_create_are_raised(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "tracking.enabled=true"])

    def refuse(self, name, *args, **kwargs):
        raise MlflowException("name not allowed", error_code="INVALID_PARAMETER_VALUE")

    monkeypatch.setattr(MlflowClient, "create_registered_model", refuse)
    with pytest.raises(MlflowException, match="not allowed"), job_run(cfg, "train") as run:
        run.register_model("model")


def test_the_run_stays_running_when_fitting_ends_and_takes_the_jobs_outcome(tmp_path: Path) -> None:
    """Lightning ends its logger when fitting stops: the run must not read FINISHED while the job still
    registers and writes its model (a job killed then stays RUNNING, README), nor when the job fails later."""
    from mlflow import MlflowClient

    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "tracking.enabled=true"])
    with pytest.raises(RuntimeError, match="after fitting"):
        with job_run(cfg, "train") as run:
            logger = run.lightning_logger()
            logger.log_metrics({"val/ndcg_at_10": 0.5}, step=1)
            logger.finalize("success")  # what Trainer.fit does when it stops
            assert MlflowClient(tracking_uri=run.uri).get_run(run.run_id).info.status == "RUNNING"
            raise RuntimeError("the job fails after fitting")
    finished = MlflowClient(tracking_uri=run.uri).get_run(run.run_id)
    assert finished.info.status == "FAILED" and finished.data.metrics["val/ndcg_at_10"] == 0.5
