"""A tracking server that does not answer (a closed port): jobs fail in bounded time, name the URI, and
keep their local outputs (a trained model is never lost)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import time

import pytest

from pipelines.cli import EXIT_FAILED, EXIT_OK, main
from recsys.storage import read_json
from tests.conftest import free_port
from tests.pipelines.conftest import tiny

# Default tracking.http_* (2 retries, backoff factor 1): a refused connection gives up after ~3 s. The bound
# leaves room for the job's own work on a loaded machine; MLflow's defaults would retry for minutes.
BOUND_S = 25.0


@pytest.fixture(scope="module")
def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _timed(*args: str) -> tuple[int, float]:
    start = time.monotonic()
    code = main([args[0], "--quiet", *args[1:]])
    return code, time.monotonic() - start


def test_train_fails_in_bounded_time_naming_the_uri_and_keeps_the_model(
    dead_uri, tiny_features, tmp_path, capsys
):
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    code, elapsed = _timed("train", *tiny(work), "tracking.enabled=true", f"tracking.uri={dead_uri}")
    assert code != EXIT_OK and elapsed < BOUND_S, elapsed
    err = capsys.readouterr().err
    assert f"MLflow tracking server {dead_uri} is unavailable" in err
    assert (work / "model" / "model.pt").is_file()  # nothing lost
    assert read_json(work / "model" / "train_report.json")["registered_version"] is None


def test_candidates_from_the_registry_fail_fast_naming_the_uri(dead_uri, tiny_features, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    code, elapsed = _timed("candidates", "--model", "models:/sasrec@champion", "--date", "2024-05-01",
                           *tiny(work), "tracking.enabled=true", f"tracking.uri={dead_uri}")
    assert code != EXIT_OK and elapsed < BOUND_S, elapsed
    assert dead_uri in capsys.readouterr().err
    assert not (work / "candidates" / "date=2024-05-01").exists()


def test_a_silent_server_times_out_after_tracking_http_timeout_s(tiny_features, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, elapsed = _timed("candidates", "--model", "models:/sasrec@champion", *tiny(work),
                               "tracking.enabled=true", f"tracking.uri={uri}", "tracking.http_timeout_s=1",
                               "tracking.http_max_retries=1")
    # 2 attempts of 1 s plus a backoff of at most ~1.5 s; without the setting MLflow would wait 8 x 120 s.
    assert code != EXIT_OK and 2.0 <= elapsed < 15.0, elapsed
    assert uri in capsys.readouterr().err


def test_a_server_that_stops_answering_during_training_costs_no_work(tiny_features, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    """The server answers at the start and fails once training logs its epochs (the embedded store standing in
    for a server, its metric writes failing as a dead server's do): tracking is turned off from then on, the
    model is still trained and written, and the job fails at the end naming the URI (before: exit 1 from
    Lightning's logger mid-training, model/ never written)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import recsys.tracking

    monkeypatch.setattr(recsys.tracking, "_server_failure", lambda uri, exc: isinstance(exc, MlflowException))
    log_batch = MlflowClient.log_batch

    def dead_for_metrics(self, run_id, metrics=(), *args, **kwargs):  # params and tags still get through
        if metrics:
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed: connection refused")
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", dead_for_metrics)
    work = tmp_path / "work"
    shutil.copytree(tiny_features, work / "features")
    code = main(["train", "--quiet", *tiny(work), "tracking.enabled=true"])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "is unavailable" in err and "stopped answering during the job" in err and "Traceback" not in err
    assert (work / "model" / "model.pt").is_file()  # nothing lost
    report = read_json(work / "model" / "train_report.json")
    assert report["registered_version"] is None and report["epochs_run"] == 4
    with sqlite3.connect(work / "mlflow.db") as db:  # the store answers again at the end: a run that lost its
        assert db.execute("select status from runs").fetchall() == [("FAILED",)]  # metrics is not FINISHED


def test_a_server_that_dies_at_the_promotion_gate_costs_no_evaluation(tiny_features, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    """The gate's registry calls were outside the guard: a raw MlflowException, exit 1 with a traceback, and
    no report.json (the previous model's evaluation stayed, STALE). Now as a server down from the start."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import recsys.tracking
    from tests.pipelines.conftest import train_tiny

    work = train_tiny(tmp_path / "work", tiny_features)
    assert main(["train", "--quiet", "--force", *tiny(work), "tracking.enabled=true"]) == EXIT_OK  # version 1
    monkeypatch.setattr(recsys.tracking, "_server_failure", lambda uri, exc: isinstance(exc, MlflowException))

    def dead(self, *args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/registered-models/get failed: refused")

    monkeypatch.setattr(MlflowClient, "get_registered_model", dead)
    assert main(["evaluate", "--quiet", *tiny(work), "tracking.enabled=true"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "stopped answering during the job" in err and "Traceback" not in err
    assert (work / "evaluation" / "report.json").is_file()
    assert read_json(work / "evaluation" / "promotion.json")["summary"].startswith("not run: the MLflow tracking")


def test_a_server_refusing_a_request_is_no_outage() -> None:
    """A 4xx answer (a bad metric name, a name a concurrent job took) was reported as the server "stopped
    answering" and turned tracking off; it is raised. A 5xx answer or no answer is an outage."""
    from mlflow.exceptions import RestException

    from recsys.config import load_config
    from recsys.tracking import JobRun

    cfg = load_config(None, ["tracking.uri=http://mlflow.internal:5000"])

    def answer(code: str):
        def call():
            raise RestException({"error_code": code, "message": "refused"})
        return call

    run = JobRun("run1", cfg.tracking.uri, "sasrec", cfg=cfg)
    with pytest.raises(RestException, match="refused"):
        run.guarded(answer("INVALID_PARAMETER_VALUE"))
    assert run.active and run.unavailable is None
    assert run.guarded(answer("TEMPORARILY_UNAVAILABLE")) is None
    assert not run.active and "is unavailable" in str(run.unavailable)


def test_evaluate_with_the_server_down_says_the_gate_did_not_run(dead_uri, tiny_features, tmp_path, capsys):
    """The report replaces the previous one; its promotion.json (another model's decision) went with it and
    nothing said the gate had not run: `recsys status` showed a current evaluation with no promotion."""
    from tests.pipelines.conftest import train_tiny

    work = train_tiny(tmp_path / "work", tiny_features)
    (work / "evaluation").mkdir()
    (work / "evaluation" / "promotion.json").write_text('{"promoted": true, "summary": "an earlier model"}')
    code, _ = _timed("evaluate", *tiny(work), "tracking.enabled=true", f"tracking.uri={dead_uri}")
    assert code == EXIT_FAILED and dead_uri in capsys.readouterr().err
    promotion = read_json(work / "evaluation" / "promotion.json")
    assert promotion["promoted"] is None and promotion["summary"].startswith(f"not run: the MLflow tracking server "
                                                                            f"{dead_uri} was unavailable")
    assert (work / "evaluation" / "report.json").is_file()
