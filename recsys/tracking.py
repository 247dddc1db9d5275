"""MLflow tracking: one run per job, params from the flattened config, metrics, artifacts, model registry.

This module, :mod:`recsys.registry` and :mod:`recsys.retention` are the only ones of ours that import mlflow to
track (and
:mod:`recsys.serving`, for the pyfunc model). With ``tracking.uri`` unset the store is an embedded SQLite database in the work directory (no server needed); artifacts go to
``<work_dir>/mlartifacts``.

A tracking SERVER that cannot be reached never costs a job its work: the HTTP client's timeout and retries
come from ``tracking.http_*`` (so a dead server is detected in bounded time, see :func:`configure_http`),
the job then runs with tracking off, writes its local outputs as usual, and fails at the end with a
:class:`TrackingUnavailableError` naming the URI. The same holds for a server that stops answering during
the job (e.g. while training logs its epochs): tracking is turned off from that call on.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from recsys.config import Config, ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")
CONTENT_TAG = "content_sha256"  # model version tag: SHA-256 of the registered model files


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server did not answer; the message names the URI and what was kept locally."""


def tracking_uri(cfg: Config) -> str:
    """The configured URI, or the embedded SQLite store in the work directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    # SQLAlchemy percent-decodes the database path: a literal % (work/pct%41dir) must be written %25, or the store
    # lands in another directory (work/pctAdir)
    path = str(Path(cfg.work_dir).resolve() / "mlflow.db")
    return f"sqlite:///{re.sub(r'%(?=[0-9A-Fa-f]{2})', '%25', path)}"  # only what SQLAlchemy would decode


def sqlite_store(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI (the embedded store, or one set in ``tracking.uri``), else None."""
    from urllib.parse import unquote

    return Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0])) if uri.startswith("sqlite:///") else None


def _store_fix(path: Path) -> str:
    return (f"MLflow's run history and model registry live in it. Restore it from a backup; or, once no job uses "
            f"it, move it aside (mv {path} {path}.damaged) to start an empty store: registered versions are then "
            "lost, the next `recsys run` trains and registers a model afresh (the files of earlier runs stay under "
            "mlartifacts/). On shared storage without working file locks (NFS mounted nolock) a store another "
            "host writes can read as damaged for a moment: rerun once before moving it")


def check_sqlite_store(uri: str) -> None:
    """Raise :class:`recsys.storage.DamagedFileError` naming the SQLite file of ``uri`` when it exists but is no
    readable SQLite database (overwritten, or truncated below the pages its header counts): SQLAlchemy's own
    error names neither the file nor what to do. Cheap: the header and the schema only (milliseconds and a
    shared lock as short, whatever the store's size; a damaged data page is caught when MLflow reads it, see
    :func:`damaged_store`). A store that is busy or cannot be opened is left to MLflow's own error."""
    import sqlite3
    from contextlib import closing
    from urllib.parse import quote

    from recsys.storage import damaged

    path = sqlite_store(uri)
    if path is None or not path.is_file() or path.stat().st_size == 0:  # no store yet: MLflow creates it
        return
    try:
        with closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=30)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            pages = db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
            wal = db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # pages may sit in the -wal file
    except sqlite3.DatabaseError as exc:  # not a database, malformed; not a lock, a permission (left to MLflow)
        if not _corrupt(exc):
            return
        raise damaged(path, exc, _store_fix(path)) from None
    if not wal and pages > path.stat().st_size:
        raise damaged(path, ValueError(f"{path.stat().st_size} bytes, shorter than the {pages} its header "
                                       "counts: truncated"), _store_fix(path))


def _corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's word on the file's bytes: SQLITE_CORRUPT ("database disk image is malformed")
    or SQLITE_NOTADB ("file is not a database"); not a constraint (IntegrityError: two jobs creating one experiment),
    a lock or a misuse, which are all DatabaseErrors too."""
    import sqlite3

    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) if code is not None \
        else type(exc) is sqlite3.DatabaseError


def damaged_store(exc: BaseException, uri: str | None) -> Exception | None:
    """The :class:`recsys.storage.DamagedFileError` naming the SQLite store of ``uri`` when ``exc`` (raised by a
    job) comes from its bytes (SQLite: malformed, not a database; not a lock or a permission), else None."""
    from recsys.storage import damaged

    path = None if uri is None else sqlite_store(uri)
    cause: BaseException | None = exc
    seen: set[int] = set()
    while path is not None and cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if _corrupt(cause):
            return damaged(path, cause, _store_fix(path))
        # SQLAlchemy keeps the driver's error as .orig; MLflow re-raises with a cause
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return None


def configure_http(cfg: Config) -> None:
    """Set MLflow's HTTP client timeout, retries and backoff (process-wide) from ``tracking.http_*``.

    One request to an unreachable server then gives up after at most about
    ``(http_max_retries + 1) * http_timeout_s + http_backoff_factor * 2 ** http_max_retries`` seconds
    (a refused connection fails at once, so only the backoff counts there). MLflow's own defaults
    (7 retries, backoff factor 2, 120 s timeout) would wait for many minutes.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.tracking.http_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.tracking.http_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.tracking.http_backoff_factor)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in job logs


def all_pages(search: Callable[..., Any], **kwargs: Any) -> list[Any]:
    """Every result of an MLflow ``search_*`` call (``client.search_model_versions``, ``search_runs``), page by
    page: one call returns a page only (at most 10,000 versions on a SQLite store)."""
    out: list[Any] = []
    token = None
    while True:
        page = search(**kwargs, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


@dataclass
class JobRun:
    """Handle on an active MLflow run (a no-op when tracking is disabled or its server is unreachable)."""

    run_id: str | None
    uri: str | None
    registered_model: str
    unavailable: TrackingUnavailableError | None = None
    cfg: Config | None = None  # for the message of a server that stops answering during the job

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def require(self) -> None:
        """Raise now if tracking was asked for but its server is unreachable (before work that needs it)."""
        if self.unavailable is not None:
            raise self.unavailable

    def guarded(self, call: Callable[[], T]) -> T | None:
        """``call()`` (an MLflow call of this run), None when tracking is off. If a tracking SERVER stops
        answering, tracking is turned off for the rest of the job (logged; :func:`job_run` raises
        ``unavailable`` once the job's own work is done) instead of failing the job's work mid-way."""
        if self.run_id is None:
            return None
        try:
            return call()
        except Exception as exc:
            if self.cfg is None or self.uri is None or not _server_failure(self.uri, exc):
                raise
            self.unavailable = _unavailable(self.cfg, self.uri, exc, during=True)
            log.error("%s", self.unavailable)
            self.run_id = None
            return None

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        """``mlflow.<name>(*args, **kwargs)`` into this run, :meth:`guarded`; nothing (MLflow not even imported:
        it need not be installed) with tracking off."""
        if not self.active:
            return
        import mlflow

        self.guarded(lambda: getattr(mlflow, name)(*args, **kwargs))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", {k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", str(local_dir), artifact_path=artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(local_file), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_dataset(self, frame: Any, name: str, source: str | Path, digest: str, context: str) -> None:
        """Record ``frame`` (a polars DataFrame, read at ``source``) as an input of the run (MLflow's "Datasets
        used": its schema, row count, source and ``digest``); ``context`` says how the job used it, e.g.
        ``training``. The data itself is not uploaded."""
        if self.run_id is None:
            return
        import mlflow

        with warnings.catch_warnings():  # MLflow registers the local-path source twice and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_polars(frame, source=Path(source).resolve().as_uri(), name=name,
                                              digest=digest[:36])  # the tracking store's digest column
        self.guarded(lambda: mlflow.log_input(dataset, context=context))

    def register_model(self, artifact_path: str, digest: str | None = None) -> str | None:
        """Register the run's ``artifact_path`` directory as a new version of the registered model.

        With ``digest`` (the content's SHA-256, tag ``content_sha256``) a version holding the same content is
        reused instead: a retried run (killed after registering, or failing in a later job) that resumes to the
        same weights does not add a copy of them, which the gate would then promote over the original.
        """
        return self.guarded(lambda: self._register(artifact_path, digest))

    def _register(self, artifact_path: str, digest: str | None) -> str:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        name = self.registered_model
        exists = client.search_registered_models(filter_string=f"name = '{name}'") != []
        if not exists:
            try:
                client.create_registered_model(name)
            except MlflowException as exc:  # another job's first registration (a shard, a rerun), or a
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # retried request whose first reply was lost
                    raise
                log.info("registered model %s was created meanwhile (another job, or a retried request): "
                         "registering into it", name)
                exists = True
        if exists and digest is not None:
            same = [mv for mv in all_pages(client.search_model_versions, filter_string=f"name = '{name}'")
                    if mv.tags.get(CONTENT_TAG) == digest]
            if same:
                version = min(same, key=lambda mv: int(mv.version)).version
                log.info("model %s version %s holds the same content (%s %s…): reused, not registered again",
                         name, version, CONTENT_TAG, digest[:12])
                return str(version)
        source = mlflow.get_artifact_uri(artifact_path)
        tags = None if digest is None else {CONTENT_TAG: digest}
        version = client.create_model_version(name, source=source, run_id=self.run_id, tags=tags)
        log.info("registered model %s version %s", name, version.version)
        return str(version.version)

    def lightning_logger(self) -> Any:
        """An MLFlowLogger writing epoch metrics into this run (None when tracking is off)."""
        if self.run_id is None:
            return None
        from pytorch_lightning.loggers import MLFlowLogger

        job = self

        class _Logger(MLFlowLogger):  # every call through job.guarded: a server gone mid-training stops logging
            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                job.guarded(lambda: MLFlowLogger.log_metrics(self, metrics, step))

            def log_hyperparams(self, params: Any) -> None:
                job.guarded(lambda: MLFlowLogger.log_hyperparams(self, params))

            def finalize(self, status: str = "success") -> None:
                """Nothing: Lightning's would mark the run FINISHED when fitting stops, before the job registers
                its model; :func:`job_run` ends the run with the job's own outcome (a job killed later stays
                RUNNING, one that fails later is FAILED). No checkpoint is logged here (log_model is off)."""

        return _Logger(tracking_uri=self.uri, run_id=self.run_id)


def _experiment_id(cfg: Config) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":  # a run cannot start in it, nor a new one take its name
        raise ConfigError(
            f"tracking.experiment: the MLflow experiment {cfg.tracking.experiment!r} (id {exp.experiment_id}) is "
            f"deleted; restore it (`mlflow experiments restore --experiment-id {exp.experiment_id}`), or set "
            "tracking.experiment to another name")
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if not cfg.tracking.uri:
        artifacts = (Path(cfg.work_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)


def _server_failure(uri: str, exc: Exception) -> bool:
    """Whether ``exc`` is a tracking SERVER's failure to answer (a local store's errors are bugs: raised). A
    server that answers with a refusal of the request (a 4xx ``RestException``: a bad metric name, a name taken
    by a concurrent job) is no outage: that is raised too, not hidden by turning tracking off."""
    from mlflow.exceptions import MlflowException, RestException
    from requests.exceptions import RequestException

    if not uri.startswith(("http://", "https://")):
        return False
    if isinstance(exc, RestException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, MlflowException | RequestException)


def _unavailable(cfg: Config, uri: str, exc: Exception, during: bool = False) -> TrackingUnavailableError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    done = ("It stopped answering during the job: tracking was turned off from then on (nothing more was logged "
            "or registered; the MLflow run is ended FAILED if the server answered again, else it stays RUNNING)"
            if during else "Nothing was logged or registered")
    error = TrackingUnavailableError(
        f"MLflow tracking server {uri} is unavailable: {first_line}. {done}; "
        f"whatever the job could do without the server is kept under {Path(cfg.work_dir).resolve()}. "
        f"Check tracking.uri and the server (gave up after {cfg.tracking.http_max_retries} retries, "
        f"{cfg.tracking.http_timeout_s} s timeout per request: tracking.http_*)."
    )
    error.__cause__ = exc
    return error


@contextmanager
def job_run(cfg: Config, job: str, tags: dict[str, Any] | None = None) -> Iterator[JobRun]:
    """Start one MLflow run for ``job`` with the flattened config as params; ends FAILED on error.

    If the tracking server cannot be reached, the block runs with a no-op handle (``unavailable`` set) and
    :class:`TrackingUnavailableError` is raised once it has finished, so local outputs are never lost.
    """
    if not cfg.tracking.enabled:
        yield JobRun(None, None, cfg.tracking.registered_model)
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_http(cfg)
    uri = tracking_uri(cfg)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    check_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = _experiment_id(cfg)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=job)
    except MlflowException as exc:
        if not uri.startswith(("http://", "https://")):
            raise
        error = _unavailable(cfg, uri, exc)
    else:
        error = None
    if error is not None:
        log.error("%s", error)
        yield JobRun(None, uri, cfg.tracking.registered_model, unavailable=error)
        raise error
    handle = JobRun(run.info.run_id, uri, cfg.tracking.registered_model, cfg=cfg)

    def start() -> None:
        mlflow.set_tags({"job": job, **{k: str(v) for k, v in (tags or {}).items()}})
        mlflow.log_params({k: str(v)[:6000] for k, v in cfg.flat().items()})
        mlflow.log_dict(cfg.to_dict(), "config.json")

    try:
        handle.guarded(start)
        yield handle
    except BaseException:  # a failed job (SIGTERM's SystemExit too) ends its run FAILED, as mlflow.start_run's
        _end_run(handle, "FAILED")  # context does; the job's own exception is what propagates
        raise
    _end_run(handle, "FAILED" if handle.unavailable is not None else "FINISHED")  # a run that lost logs: not FINISHED
    if handle.unavailable is not None:
        raise handle.unavailable


def _end_run(handle: JobRun, status: str) -> None:
    """End the active MLflow run with ``status``: MLflow pops it locally first, then tells the server; when the
    server stopped answering during the job, its failure to answer again is expected (and ignored)."""
    import mlflow

    if handle.active:
        handle.guarded(lambda: mlflow.end_run(status))
    else:
        try:
            mlflow.end_run(status)
        except Exception as exc:
            if handle.uri is None or not _server_failure(handle.uri, exc):
                raise
