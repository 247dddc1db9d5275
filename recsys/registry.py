"""MLflow model registry: the promotion gate (``challenger`` → ``champion``) and fetching a version's files.

With :mod:`recsys.tracking`, the only module of ours that imports mlflow to track (:mod:`recsys.serving` does
to write the pyfunc model). Every function here runs inside
:func:`recsys.tracking.job_run`, which has set the tracking URI and the HTTP client's limits.

Promotion gate: the version trained in a work directory always gets the alias ``challenger``; it also gets
``champion`` if its validation NDCG@10 is at least the current champion's minus ``tolerance`` (the first
version of a model has no champion to beat and is promoted). Rolling back is moving the alias by hand:
``MlflowClient().set_registered_model_alias(name, "champion", old_version)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.config import ConfigError
from recsys.storage import scratch_dir
from recsys.tracking import CONTENT_TAG, JobRun, TrackingUnavailableError, _server_failure, all_pages

if TYPE_CHECKING:
    from recsys.comparison import Comparison

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
VAL_METRIC = "best_val_ndcg_at_10"  # logged by the train job; also model/train_report.json
STALE_CHAMPION_NIGHTS = 3  # kept out this many versions in a row by the recorded gate: a warning says why
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class Promotion:
    """The gate's decision for one model version and the numbers it was taken on."""

    model: str
    version: str
    promoted: bool
    reason: str
    challenger_val_ndcg_at_10: float
    champion_version: str | None  # the champion BEFORE the gate ran
    champion_val_ndcg_at_10: float | None
    tolerance: float
    basis: str = "recorded"  # "rescored": both numbers measured tonight on the same users
    comparison: dict[str, Any] | None = None  # recsys.comparison.Comparison.to_dict() when rescored
    # versions registered after the champion that the gate kept out, this one included (0 when promoted)
    kept_out_in_a_row: int = 0

    def summary(self) -> str:
        """One line for the CLI summary."""
        after = self.version if self.promoted else self.champion_version
        verdict = "promoted to champion" if self.promoted else "stays challenger"
        return f"{self.model} v{self.version} {verdict} ({self.reason}); champion is v{after}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    challenger: float, champion: float | None, tolerance: float, has_champion: bool = True
) -> tuple[bool, str]:
    """(promote?, reason): promote iff there is no champion or ``challenger >= champion - tolerance``.

    A champion without a recorded validation NDCG@10 is never replaced automatically.
    """
    if not has_champion:
        return True, "first model: no champion yet"
    if champion is None:
        return False, "the champion has no validation NDCG@10 recorded; move the alias by hand"
    bar = champion - tolerance
    if challenger >= bar:
        return True, f"val NDCG@10 {challenger:.4f} >= {champion:.4f} - {tolerance:g}"
    return False, f"val NDCG@10 {challenger:.4f} < {champion:.4f} - {tolerance:g}"


def _val_ndcg(client: Any, name: str, version: str) -> float | None:
    """The version's validation NDCG@10: its train run's metric, else (no such metric, or the run deleted for
    good, e.g. by ``mlflow gc``) its ``val_ndcg_at_10`` tag."""
    mv = client.get_model_version(name, version)
    if mv.run_id:
        run = _missing_is_none(lambda: client.get_run(mv.run_id))
        value = None if run is None else run.data.metrics.get(VAL_METRIC)
        if value is not None:
            return float(value)
    tag = mv.tags.get("val_ndcg_at_10")
    return float(tag) if tag is not None else None


def _measured_with(client: Any, name: str, version: str) -> str | None:
    """The ``evaluate.exclude_seen`` the version's recorded validation NDCG@10 was measured with (its train run's
    param, lower case; a run of a release before that key always left seen items out: "true"); None when
    unknown (no train run, or it was deleted for good)."""
    mv = client.get_model_version(name, version)
    run = _missing_is_none(lambda: client.get_run(mv.run_id)) if mv.run_id else None
    return None if run is None else run.data.params.get("evaluate.exclude_seen", "true").lower()


def _outage(uri: str, exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from (:func:`fetch_model` turns a failed download into
    FileNotFoundError, ``from None``) is a tracking server's failure to answer."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, TrackingUnavailableError) or (isinstance(seen, Exception) and _server_failure(uri, seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _rescored(tracker: JobRun, name: str, champion: str, rescore: Callable[[Path], Comparison],
              fallback: tuple[str, str] | None) -> Comparison | None:
    """Both models measured by ``rescore`` on the champion's registered files; with ``fallback`` (the recorded
    basis, rescoring only because the recorded numbers do not compare), None when that fails, with a warning."""
    assert tracker.cfg is not None  # an active run's handle carries its config
    try:
        with scratch_dir(Path(tracker.cfg.work_dir), "champion-model") as tmp:
            _, files = fetch_model(tracker, f"models:/{name}/{champion}", Path(tmp))
            return rescore(files)
    except Exception as exc:
        # an outage is the gate's failure (tracking off, "did not run"), not a reason to decide on other numbers
        if fallback is None or _outage(tracker.uri, exc):
            raise
        log.warning("promotion gate: rescoring champion v%s failed (%s: %s); the recorded numbers decide, though "
                    "measured with evaluate.exclude_seen=%s and %s", champion, type(exc).__name__, exc, *fallback)
        return None


def promote(
    tracker: JobRun, version: str, val_ndcg: float, tolerance: float,
    rescore: Callable[[Path], Comparison] | None = None, content: str | None = None,
    incomparable: Callable[[Path], Comparison] | None = None,
) -> Promotion | None:
    """Run the gate for ``version`` of the tracker's registered model; log it on the run and the version.

    ``content`` (SHA-256 of the evaluated files, ``pipelines.workdir.content_digest``) must be that version's
    ``content_sha256`` tag: a model registered under another ``tracking.registered_model`` or in another store
    (two configs sharing one work directory) raises ConfigError instead of gating an unrelated version.

    With ``rescore`` (``tracking.promotion_basis=rescored``) the champion's files are downloaded and
    ``rescore(directory)`` measures both models on the same users tonight; the gate then compares those two
    numbers instead of the ones recorded at training time. On the recorded basis, ``incomparable`` (the same
    measurement) is used instead when the champion's recorded number was measured with another
    ``evaluate.exclude_seen`` than the challenger's (a ranking with seen items competing scores lower: the two
    numbers do not compare); if that rescoring fails, the recorded numbers decide, with a warning. Returns None
    (and does nothing) when tracking is off.
    """
    if not tracker.active:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracker.uri)
    name = tracker.registered_model
    gated = _missing_is_none(lambda: client.get_model_version(name, version))
    held = None if gated is None else gated.tags.get(CONTENT_TAG)
    if gated is None or (content is not None and held is not None and held != content):
        what = "does not exist (deleted from the registry since?)" if gated is None else \
            f"holds other files (content_sha256 {held[:12]}…, the evaluated model {content[:12]}…)"
        raise ConfigError(
            f"promotion gate: the evaluated model was registered as version {version}, but version {version} of "
            f"tracking.registered_model {name!r} in {tracker.uri} {what}; or the model was trained under another "
            "tracking.registered_model or tracking.uri (two configs sharing one work_dir?). Evaluate with the "
            "config that trained it, or train again with this one; nothing was gated")
    before = client.get_registered_model(name).aliases.get(CHAMPION)
    before = None if before is None else str(before)  # the SQL store gives ints, the REST API strings
    comparison = None
    first = gated.tags  # its earlier decision, if it was gated before
    rerun = before == version
    # Promoted before, and the champion alias points elsewhere now: an operator rolled it back (a retried night
    # re-evaluates the same version). The gate must not undo that, nor overwrite the decision recorded on it.
    # ("promotion.applied" false: the server went away between the decision and the alias move, so the gate
    # never took effect; versions gated before that tag existed count as applied.)
    rolled_back = (not rerun and before is not None and first.get("promotion.promoted") == "true"
                   and first.get("promotion.applied") != "false")
    replaced = before  # the champion before the gate
    fallback = None  # the two exclude_seen settings, when the recorded numbers do not compare
    if not rerun and not rolled_back and before is not None and rescore is None and incomparable is not None:
        theirs, ours = _measured_with(client, name, before), _measured_with(client, name, version)
        if None not in (theirs, ours) and theirs != ours:
            log.warning("promotion gate: champion v%s's recorded validation NDCG@10 was measured with "
                        "evaluate.exclude_seen=%s, v%s's with %s: both models are rescored on tonight's validation "
                        "users instead", before, theirs, version, ours)
            rescore, fallback = incomparable, (theirs, ours)
    if rerun:  # evaluate run again on the champion: its first decision (and rollback target) stays recorded
        over = first.get("promotion.champion_version", "None")
        replaced = None if over == "None" else over  # the one its first decision replaced, not itself
        recorded = first.get("promotion.champion_val_ndcg_at_10", "None")
        promoted, champion = True, None if recorded == "None" else float(recorded)
        reason = (f"already the champion (gated by run {first.get('promotion.run_id', 'unknown')}: "
                  f"{first.get('promotion.reason', 'no decision recorded')}; champion before it: "
                  f"{'none' if replaced is None else f'v{replaced}'})")
    elif rolled_back:
        promoted, champion = False, _val_ndcg(client, name, before)
        reason = (f"promoted before (by run {first.get('promotion.run_id', 'unknown')}), since rolled back: the "
                  f"champion alias was moved to v{before}; it stays challenger (move the alias by hand to promote "
                  "it again)")
    elif before is not None and rescore is not None and (comparison := _rescored(
            tracker, name, before, rescore, fallback)) is not None:
        val_ndcg, champion = comparison.challenger, comparison.champion
        promoted, reason = decide(val_ndcg, champion, tolerance)
        se = "" if comparison.delta_se is None else f" ± {1.96 * comparison.delta_se:.4f}"
        reason += (f", both rescored on tonight's {comparison.users_compared} validation users (paired "
                   f"difference {comparison.delta:+.4f}{se})")
    else:
        champion = _val_ndcg(client, name, before) if before is not None else None
        promoted, reason = decide(val_ndcg, champion, tolerance, has_champion=before is not None)
    kept_out = 0 if promoted or before is None else _kept_out_in_a_row(client, name, before, version)
    if kept_out >= STALE_CHAMPION_NIGHTS and comparison is None:
        log.warning("promotion gate: v%s is the %d. version in a row kept out against champion v%s on recorded "
                    "validation numbers, which come from the data each model was trained on: if the data grew or "
                    "changed, those do not compare; tracking.promotion_basis=rescored scores both on tonight's "
                    "users", version, kept_out, before)
    result = Promotion(name, version, promoted, reason, val_ndcg, replaced, champion, tolerance,
                       "recorded" if comparison is None else "rescored",
                       None if comparison is None else comparison.to_dict(), kept_out)
    # The decision is recorded before any alias moves: a failure in between leaves a record, not a silent move.
    _log_promotion(client, tracker, result, tag_version=not (rerun or rolled_back))
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        # also on a rerun whose first gate was cut off after the alias moved but before this tag: left "false",
        # a later rollback of the version would not be recognised and a retried night would undo it
        if not rolled_back and (not rerun or first.get("promotion.applied") == "false"):
            client.set_model_version_tag(name, version, "promotion.applied", "true")
    log.info("promotion gate: %s", result.summary())
    return result


def _log_promotion(client: Any, tracker: JobRun, p: Promotion, tag_version: bool = True) -> None:
    """The decision as tags and metrics of the evaluate run and, with ``tag_version``, tags of the version."""
    tags = {
        "promotion.promoted": str(p.promoted).lower(),
        "promotion.reason": p.reason,
        "promotion.champion_version": str(p.champion_version),
        "promotion.champion_val_ndcg_at_10": str(p.champion_val_ndcg_at_10),
        "promotion.tolerance": str(p.tolerance),
        "promotion.basis": p.basis,
    }
    # promotion.applied: "false" until the champion alias has moved (promote sets it "true" then)
    applied = {"promotion.applied": "false"} if p.promoted else {}
    for key, value in {**tags, "val_ndcg_at_10": str(p.challenger_val_ndcg_at_10),
                       "promotion.run_id": str(tracker.run_id), **applied}.items() if tag_version else ():
        client.set_model_version_tag(p.model, p.version, key, value)
    tracker.set_tags({**tags, "promotion.version": p.version})
    tracker.log_metrics({
        "promotion/promoted": float(p.promoted),
        "promotion/challenger_val_ndcg_at_10": p.challenger_val_ndcg_at_10,
        "promotion/champion_val_ndcg_at_10": p.champion_val_ndcg_at_10,  # None is dropped
        "promotion/tolerance": p.tolerance,
    })


def _kept_out_in_a_row(client: Any, name: str, champion: str, version: str) -> int:
    """How many versions of ``name`` registered after ``champion`` the gate kept out (tag
    ``promotion.promoted=false``), ``version`` (kept out now) included."""
    later = all_pages(client.search_model_versions, filter_string=f"name='{name}'")
    others = [mv for mv in later if int(mv.version) > int(champion) and str(mv.version) != version]
    return 1 + sum(mv.tags.get("promotion.promoted") == "false" for mv in others)


def _missing_is_none(call: Callable[[], Any]) -> Any:
    """``call()``, or None if MLflow answers that what it asks for does not exist (RESOURCE_DOES_NOT_EXIST)."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def nothing_promoted(tracker: JobRun, uri: str) -> bool:
    """Whether ``uri`` is ``models:/NAME@ALIAS`` for the model this job registers (tracking.registered_model) and
    nothing to start from exists yet: no model NAME in the registry, or (a first night that registered a version
    and stopped before its promotion gate) ALIAS on none of its versions and none ever promoted. False for any
    other URI (another name: a typo stays an error), with tracking off, or once a version was promoted (a removed
    or rolled-back alias then stays an error)."""
    match = _MODELS_URI.match(uri)
    if match is None or match["alias"] is None or not tracker.active or match["name"] != tracker.registered_model:
        return False
    tracker.require()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracker.uri)
    model = _missing_is_none(lambda: client.get_registered_model(match["name"]))
    if model is None:
        return True
    if match["alias"] in (model.aliases or {}):
        return False
    versions = all_pages(client.search_model_versions, filter_string=f"name='{match['name']}'")
    return not any(mv.tags.get("promotion.promoted") == "true" for mv in versions)


@dataclass(frozen=True)
class ModelRef:
    """Which model a job used: the URI asked for and, for the registry, the version it resolved to."""

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pinned_version(spec: str | None) -> tuple[str, str] | None:
    """``(name, version)`` of a ``models:/NAME/VERSION`` URI; None for anything else (an alias, ``runs:/``, a
    directory, None)."""
    match = _MODELS_URI.match(spec or "")
    return None if match is None or match["version"] is None else (match["name"], match["version"])


def is_mlflow_uri(spec: str) -> bool:
    """``models:/…``, ``runs:/…`` or another ``scheme:/…`` URI (as opposed to a local directory)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", spec) is not None


def fetch_model(tracker: JobRun, uri: str, dst: Path) -> tuple[ModelRef, Path]:
    """Download the files of ``uri`` (``models:/name@alias``, ``models:/name/version``, ``runs:/id/model``)
    under ``dst``; returns what it resolved to and the local directory holding the files. A registry URI
    is pinned to the version its alias points to before downloading (an alias moved meanwhile is no race).

    Raises TrackingUnavailableError if the server is unreachable, ConfigError on a malformed models:/ URI, on
    one the registry does not hold, or when tracking is off.
    """
    tracker.require()
    if not tracker.active:
        raise ConfigError(f"model {uri} is an MLflow URI but tracking is disabled; set tracking.enabled=true")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref, source = ModelRef(uri), None
    if uri.startswith("models:/"):
        match = _MODELS_URI.match(uri)
        if match is None:
            raise ConfigError(f"model URI {uri!r}: expected models:/<name>@<alias> or "
                              "models:/<name>/<version>")
        client = MlflowClient(tracking_uri=tracker.uri)
        name, alias = match["name"], match["alias"]
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, match["version"]))
        except MlflowException as exc:
            # no such model or version: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            what = f"alias {alias!r}" if alias else f"version {match['version']}"
            raise ConfigError(f"model URI {uri}: the registry {tracker.uri} has no such model version (no registered "
                              f"model {name!r}, or no {what} on it: {exc.message}); register a model first, or "
                              "point at another one") from None
        ref = ModelRef(uri, name, str(mv.version), alias, mv.run_id)
        uri, source = f"models:/{name}/{mv.version}", mv.source
    dst.mkdir(parents=True, exist_ok=True)
    from recsys.model import WEIGHTS_FILE

    def files_gone(detail: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"model {ref.uri}{f' (version {ref.version})' if ref.version else ''} {detail}: its files{f' at {source}' if source else ''} are "
            "not there. An embedded store (tracking.uri null) records absolute artifact paths, so a work directory "
            "moved or mounted under another path loses them: keep it at one path, or run an MLflow server with a "
            "database and artifact store (tracking.uri); or register the model again")

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracker.uri)
    except MlflowException as exc:  # runs:/…: the run's artifact directory is gone
        raise files_gone(f"could not be downloaded ({exc.message})") from None
    if not (Path(local) / WEIGHTS_FILE).is_file():
        raise files_gone(f"came down without its {WEIGHTS_FILE}")
    log.info("downloaded model %s (version %s, run %s) into %s", ref.uri, ref.version, ref.run_id, local)
    return ref, Path(local)


def describe_version(tracker: JobRun, uri: str, name: str, version: str | None) -> ModelRef:
    """A ModelRef for a model saved at ``uri`` (a local directory) and registered as ``version`` of ``name``;
    the version's run id is looked up when tracking is on."""
    run_id = None
    if tracker.active and version is not None:
        from mlflow import MlflowClient

        mv = _missing_is_none(lambda: MlflowClient(tracking_uri=tracker.uri).get_model_version(name, version))
        if mv is None:  # deleted from the registry since: the files here still score, the record says so
            log.warning("model %s: version %s of %s is no longer in the registry (deleted); its run id is not "
                        "recorded", uri, version, name)
        run_id = None if mv is None else mv.run_id
    return ModelRef(uri, name, version, None, run_id)
