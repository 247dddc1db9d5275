"""MLflow tracking: one run per job, params from the flattened config, metrics, artifacts, model registry.

This is the only module of ours that imports mlflow. With ``tracking.uri`` unset the store is an embedded
SQLite database in the work directory (no server needed); artifacts go to ``<work_dir>/mlartifacts``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.config import Config

log = logging.getLogger(__name__)


def tracking_uri(cfg: Config) -> str:
    """The configured URI, or the embedded SQLite store in the work directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.work_dir).resolve() / 'mlflow.db'}"


@dataclass
class JobRun:
    """Handle on an active MLflow run (a no-op when tracking is disabled)."""

    run_id: str | None
    uri: str | None
    registered_model: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        mlflow.log_metrics(clean, step=step)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.log_artifact(str(local_file), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def register_model(self, artifact_path: str) -> str | None:
        """Register the run's ``artifact_path`` directory as a new version of the registered model."""
        if self.run_id is None:
            return None
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient()
        if client.search_registered_models(filter_string=f"name = '{self.registered_model}'") == []:
            client.create_registered_model(self.registered_model)
        source = mlflow.get_artifact_uri(artifact_path)
        version = client.create_model_version(self.registered_model, source=source, run_id=self.run_id)
        log.info("registered model %s version %s", self.registered_model, version.version)
        return str(version.version)

    def lightning_logger(self) -> Any:
        """An MLFlowLogger writing epoch metrics into this run (None when tracking is off)."""
        if self.run_id is None:
            return None
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=self.uri, run_id=self.run_id)


def _experiment_id(cfg: Config) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if not cfg.tracking.uri:
        artifacts = (Path(cfg.work_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)


@contextmanager
def job_run(cfg: Config, job: str, tags: dict[str, Any] | None = None) -> Iterator[JobRun]:
    """Start one MLflow run for ``job`` with the flattened config as params; ends FAILED on error."""
    if not cfg.tracking.enabled:
        yield JobRun(None, None, cfg.tracking.registered_model)
        return
    import mlflow

    uri = tracking_uri(cfg)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=job) as run:
        mlflow.set_tags({"job": job, **{k: str(v) for k, v in (tags or {}).items()}})
        mlflow.log_params({k: str(v)[:6000] for k, v in cfg.flat().items()})
        mlflow.log_dict(cfg.to_dict(), "config.json")
        yield JobRun(run.info.run_id, uri, cfg.tracking.registered_model)
