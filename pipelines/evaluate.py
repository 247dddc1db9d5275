"""Evaluation job: full-catalogue ranking metrics of the model and the popularity baseline, then the
promotion gate for the model version trained in this work directory (``recsys.registry.promote``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from features import schema
from features.artifacts import FeatureSet, load_features
from pipelines.workdir import WorkDir, content_digest, log_features_input
from recsys.baselines import popularity_scores
from recsys.candidates import load_trained_model
from recsys.comparison import Comparison, compare_on_validation
from recsys.config import Config, ConfigError, save_config
from recsys.device import resolve_device
from recsys.evaluation import evaluate_all
from recsys.model import WEIGHTS_FILE, SASRec, load_model
from recsys.registry import promote
from recsys.storage import atomic_dir, fingerprint, read_json, read_parquet_file, write_json
from recsys.tracking import JobRun, job_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    """Evaluate on ``cfg.evaluate.split``; writes ``<work_dir>/evaluation/report.json``.

    Raises ConfigError before reading anything if ``evaluate.device`` names a GPU this machine lacks.
    """
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    wd = WorkDir.of(cfg)
    feats = load_features(wd.features)
    if cfg.evaluate.type_segments and feats.event_types is None:
        raise ConfigError("evaluate.type_segments is true but the features hold no event types: set "
                          "data.event_type_col and rebuild the features, or set evaluate.type_segments=false")
    model = load_model(wd.model, device)
    # read with the model: the version gated at the end is the one evaluated, whatever train writes meanwhile
    train_report = read_json(wd.model / "train_report.json")
    weights = fingerprint(wd.model / WEIGHTS_FILE)["sha256"]  # which model the report is of (recsys status)
    check_event_types(model, wd.model, feats)
    check_item_map(wd.model, wd.features, feats)
    log.info("evaluate: the model scores on %s (evaluate.device=%s)", device, cfg.evaluate.device)
    with job_run(cfg, "evaluate", tags={"device": str(device)}) as tracker:
        log_features_input(tracker, wd.features, feats, "evaluation")
        pop = popularity_scores(feats.sequences, feats.n_items, cfg.evaluate.split)
        results = evaluate_all(model, feats.sequences, feats.n_items, pop, cfg.evaluate, model.max_len,
                               feats.event_types)
        report = {"split": cfg.evaluate.split, "ks": list(cfg.evaluate.ks), "model_dir": str(wd.model),
                  "model_version": train_report.get("registered_version"), "model_weights_sha256": weights,
                  "device": str(device), "exclude_seen": cfg.evaluate.exclude_seen, **results}
        for name, metrics in results.items():
            split = cfg.evaluate.split
            tracker.log_metrics({f"{split}/{name}/{k}": v for k, v in metrics.items() if not isinstance(v, dict)})
            for label, segment in metrics.get("segments", {}).items():  # test/model/history_5-19/ndcg_at_10
                where = f"{split}/{name}/history_{label.replace('+', '_plus')}"  # MLflow refuses "+"
                tracker.log_metrics({f"{where}/{k}": v for k, v in segment.items()})
            for label, segment in metrics.get("type_segments", {}).items():  # test/model/target_buy/ndcg_at_10
                where = f"{split}/{name}/target_{_metric_name(label)}"
                tracker.log_metrics({f"{where}/{k}": v for k, v in segment.items()})
        # The gate runs before anything is written: if it fails (MLflow, a champion that cannot be re-scored),
        # the previous report and its promotion.json stay as they were, together.
        promotion = _promote(cfg, wd, tracker, feats, model, train_report)
        if promotion is None and tracker.unavailable is not None:  # say so: the report replaces the previous
            promotion = {"promoted": None, "summary": (  # one's decision, which was of another model
                f"not run: the MLflow tracking server {tracker.uri} was unavailable; rerun recsys evaluate once it "
                "is back")}
        with atomic_dir(wd.evaluation) as tmp:
            write_json(tmp / "report.json", report)
            save_config(cfg, tmp / "config.yaml")
            if promotion is not None:
                write_json(tmp / "promotion.json", promotion)
        tracker.log_artifacts(wd.evaluation, "evaluation")
    log.info("evaluate: report → %s", wd.evaluation / "report.json")
    return wd.evaluation


def _metric_name(label: str) -> str:
    """An event type name as an MLflow metric path part (letters, digits, ``_ - . /`` and spaces only)."""
    return re.sub(r"[^0-9A-Za-z_.\- ]", "_", label)


def check_item_map(model_dir: Path, features_dir: Path, feats: FeatureSet) -> None:
    """Raise ConfigError if the model's item map (``model_dir``/item_map.parquet) is not the one of ``feats``:
    the model scores item indices, so on another build's indices every metric would be of the wrong items."""
    name = schema.FEATURE_FILES["item_map"]
    columns = [schema.ITEM_ID, schema.ITEM_IDX]
    theirs = read_parquet_file(model_dir / name, "rerun `recsys train`", columns=columns).sort(schema.ITEM_IDX)
    ours = feats.item_map.select(columns).sort(schema.ITEM_IDX)
    if theirs.dtypes == ours.dtypes and theirs.equals(ours):
        return
    raise ConfigError(f"the model in {model_dir} was trained on other features: its item map ({theirs.height} "
                      f"items) is not the one of {features_dir / name} ({ours.height} items), so its item indices "
                      "would score the wrong items; evaluate it on the features it was trained on, or run "
                      "recsys train on these features first")


def check_event_types(model: SASRec, model_dir: Path, feats: FeatureSet) -> None:
    """Raise ConfigError if ``model`` embeds event types but ``feats`` (which it is scored on with their type
    indices, as with their item indices) hold none, or other types or in another order than its own table
    (``model_dir``/event_types.parquet)."""
    if not model.n_event_types:
        return
    path = model_dir / schema.EVENT_TYPE_FILES["event_types"]
    theirs = read_parquet_file(path, "rerun `recsys train`").select(schema.EVENT_TYPE, schema.TYPE_IDX).sort(schema.TYPE_IDX)
    ours = None if feats.event_types is None else feats.event_types.select(schema.EVENT_TYPE, schema.TYPE_IDX)
    if ours is None or not ours.sort(schema.TYPE_IDX).equals(theirs):
        held = "none" if ours is None else ours.sort(schema.TYPE_IDX)[schema.EVENT_TYPE].to_list()
        raise ConfigError(f"the model embeds the event types {theirs[schema.EVENT_TYPE].to_list()} ({path}) but the "
                          f"features hold {held}: evaluate a model on the features it was trained on (set "
                          "data.event_type_col as then, or retrain)")


def _promote(cfg: Config, wd: WorkDir, tracker: JobRun, feats: FeatureSet, model: SASRec,
             report: dict) -> dict | None:
    """Gate the registered version of ``model/`` (``model``, scored on ``feats`` when the gate re-scores, and
    its train ``report``); returns the decision for ``evaluation/promotion.json`` (None: no gate ran)."""
    version = report.get("registered_version")
    if version is None:
        if tracker.active:
            log.warning("promotion gate skipped: %s names no registered version",
                        wd.model / "train_report.json")
        return None
    trained_as = report.get("registered_model")  # recorded since the gate checks it
    if tracker.active and trained_as not in (None, tracker.registered_model):
        raise ConfigError(
            f"evaluate: {wd.model} was registered as version {version} of {trained_as!r} (in "
            f"{report.get('tracking_uri')}), not of tracking.registered_model {tracker.registered_model!r}: evaluate "
            f"with the config that trained it (tracking.registered_model={trained_as}), or train again with this "
            "one; nothing was gated")
    val_ndcg = float(report["best_val_ndcg_at_10"])
    # the gate checks the version holds these files; hashed only for the gate (the weights of a large catalogue
    # are GBs). Files replaced since the model was loaded no longer match its version: refused, never mis-gated.
    content = content_digest(wd.model) if tracker.active else None
    def rescore(champion_dir: Path) -> Comparison:  # both models on tonight's validation users
        return compare_on_validation(model, load_trained_model(champion_dir), feats.sequences,
                                     feats.item_map, model.max_len, batch_size=cfg.evaluate.batch_size,
                                     exclude_seen=cfg.evaluate.exclude_seen, event_types=feats.event_types)
    rescored = cfg.tracking.promotion_basis == "rescored"
    # guarded: a server that stops answering at the gate turns tracking off (the report is still written, with a
    # promotion.json saying the gate did not run) instead of losing the evaluation
    result = tracker.guarded(lambda: promote(tracker, str(version), val_ndcg, cfg.tracking.promotion_tolerance,
                                             rescore if rescored else None, content,
                                             incomparable=None if rescored else rescore))
    return None if result is None else {**result.to_dict(), "summary": result.summary()}
