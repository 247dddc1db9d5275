"""Training job: Lightning SASRec on the feature job's sequences; saves and registers the model."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import torch

from features import schema
from features.artifacts import FeatureSet, load_features
from pipelines.schedule import FINISHED, checkpoint_dir, today_utc
from pipelines.workdir import WorkDir, content_digest, log_features_input
from recsys.candidates import TrainedModel, load_trained_model
from recsys.config import Config, ConfigError, save_config
from recsys.data import ItemAttributes
from recsys.faults import fault_point
from recsys.model import SASRec, save_model
from recsys.registry import ModelRef, fetch_model, is_mlflow_uri, nothing_promoted
from recsys.serving import write_mlmodel
from recsys.storage import atomic_dir, scratch_dir, write_json
from recsys.tracking import JobRun, job_run
from recsys.training import check_compile_toolchain, resolve_hardware, train_model
from recsys.warmstart import WarmStart

log = logging.getLogger(__name__)


def run(cfg: Config, run_date: dt.date | None = None) -> Path:
    """Train, then write ``<work_dir>/model`` atomically: weights, id maps, config and ``train_report.json``,
    which holds the registered model version (registered before the directory is renamed into place).

    With a ``run_date`` (a scheduled run) training resumes from ``checkpoint_dir(cfg, run_date)`` if a crash
    left a resume point there; without one it starts from scratch.
    """
    # A GPU asked for but missing, or compiling on a CPU without a C++ compiler: fail before reading anything.
    accelerator, _ = resolve_hardware(cfg.train.accelerator, cfg.train.precision)
    check_compile_toolchain(cfg.train.compile, accelerator)
    wd = WorkDir.of(cfg)
    feats = load_features(wd.features)
    # The tables model/ carries, read now with the features it trains on: a features job that rebuilds them
    # while this one trains must not pair these weights with another build's id maps.
    carried = {name: (wd.features / name).read_bytes() for name in _carried_files(feats)}
    spec = cfg.train.init_from
    # A local earlier model is read before an MLflow run is opened, so a missing one fails at once.
    local = None if spec is None or is_mlflow_uri(spec) else load_trained_model(spec)
    ckpt_dir = checkpoint_dir(cfg, run_date or today_utc())
    (ckpt_dir / FINISHED).unlink(missing_ok=True)  # unfinished again until this run succeeds
    if run_date is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    with job_run(cfg, "train") as tracker, scratch_dir(wd.root, "init-model") as tmp:
        log_features_input(tracker, wd.features, feats, "training")
        warm, source = warm_start(cfg, feats, Path(tmp), tracker, local)
        result = train_model(cfg, feats.sequences, feats.n_items, ckpt_dir, logger=tracker.lightning_logger(),
                             warm_start=warm, warm_source=None if source is None else source.to_dict(),
                             attributes=model_attributes(cfg, feats),
                             n_event_types=model_event_types(cfg, feats),
                             type_weights=loss_type_weights(cfg, feats))
        report = {
            "best_val_ndcg_at_10": result.best_val_ndcg,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "resumed_from_epoch": result.resumed_from_epoch,
            "wall_time_s": result.wall_time_s,
            "seconds_per_epoch": result.seconds_per_epoch,
            "train_seconds_per_epoch": result.train_seconds_per_epoch,
            "history": result.history,
            "n_items": feats.n_items,
            "n_users": feats.n_users,
            "features_manifest": str(wd.features / schema.FEATURE_FILES["manifest"]),
            "checkpoint": str(result.best_checkpoint),
            "warm_start": result.warm_start,
        }
        tracker.log_metrics({k: v for k, v in report.items() if isinstance(v, int | float)})
        if result.warm_start is not None:
            tracker.log_metrics({f"warm_start/{k}": v for k, v in result.warm_start.items()
                                 if isinstance(v, int | float) and not isinstance(v, bool)})
        with atomic_dir(wd.model) as tmp:
            save_model(result.model, tmp)
            # an MLflow pyfunc model too (recsys/serving.py)
            write_mlmodel(tmp, feats.item_map.schema[schema.ITEM_ID], result.model.n_event_types > 0)
            fault_point("model-write")
            for name in _carried_files(feats, result.model):
                (tmp / name).write_bytes(carried[name])
            save_config(cfg, tmp / "config.yaml")
            tracker.log_artifacts(tmp, "model")
            digest = content_digest(tmp)
            report["registered_version"] = tracker.register_model("model", digest)
            if report["registered_version"] is not None:  # which registry holds it: evaluate gates that version
                report |= {"registered_model": tracker.registered_model, "tracking_uri": tracker.uri,
                           "content_sha256": digest}
            write_json(tmp / "train_report.json", report)
            tracker.log_artifact(tmp / "train_report.json", "model")
    log.info("train: best val NDCG@10 %.4f at epoch %d (%d epochs, %.1f s) → %s",
             result.best_val_ndcg, result.best_epoch + 1, result.epochs_run, result.wall_time_s, wd.model)
    return wd.model


def _carried_files(feats: FeatureSet, model: SASRec | None = None) -> list[str]:
    """Feature files that go into model/: the id maps; the attribute values (what each attribute row means,
    for warm starts and people) and the event type table (which type each type_idx is, for candidates,
    serving, warm starts) when the features have them, and, given the trained ``model``, when it uses them."""
    names = [schema.FEATURE_FILES["user_map"], schema.FEATURE_FILES["item_map"]]
    if feats.item_feature_values is not None and (model is None or model.n_feature_values):
        names.append(schema.ITEM_FEATURE_FILES["item_feature_values"])
    if feats.event_types is not None and (model is None or model.n_event_types):
        names.append(schema.EVENT_TYPE_FILES["event_types"])
    return names


def model_attributes(cfg: Config, feats: FeatureSet) -> ItemAttributes | None:
    """The item attributes the model embeds: the feature set's (data.item_features), unless
    ``model.item_features`` is false; None without them."""
    if not cfg.model.item_features or feats.item_features is None or feats.item_feature_values is None:
        return None
    return ItemAttributes.of(feats.item_features, feats.item_feature_values, feats.item_map)


def model_event_types(cfg: Config, feats: FeatureSet) -> int:
    """How many event types the model embeds: the feature set's with ``model.event_types``, else 0. Raises
    ConfigError naming both keys if the model should embed types and the features have none."""
    if not cfg.model.event_types:
        return 0
    if feats.event_types is None or feats.event_types.height == 0:
        raise ConfigError("model.event_types is true but the features hold no event types: set "
                          "data.event_type_col to the events' type column (view, cart, purchase) and rebuild the "
                          "features, or set model.event_types=false")
    return feats.event_types.height


def loss_type_weights(cfg: Config, feats: FeatureSet) -> torch.Tensor | None:
    """``train.type_weights`` as a (n_types + 1,) tensor by the features' type_idx (unlisted types and
    untyped targets weigh 1); None when it is empty. Raises ConfigError naming the key if the features have no
    types or lack a listed type."""
    weights = cfg.train.type_weights
    if not weights:
        return None
    known = [] if feats.event_types is None else feats.event_types.sort(schema.TYPE_IDX)[schema.EVENT_TYPE].to_list()
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ConfigError(f"train.type_weights names event types the features do not hold: {unknown}; they hold "
                          f"{known or 'none (set data.event_type_col)'}")
    return torch.tensor([1.0] + [weights.get(name, 1.0) for name in known])


def warm_start(
    cfg: Config, feats: FeatureSet, tmp: Path, tracker: JobRun, local: TrainedModel | None
) -> tuple[WarmStart | None, ModelRef | None]:
    """The earlier model of ``train.init_from`` (None: train from scratch) and where it came from: ``local``
    (a directory, already loaded) or an MLflow URI downloaded into ``tmp`` through the job's ``tracker``.

    Only this process (global rank 0) loads it: DDP broadcasts rank 0's weights to the other processes when it
    wraps the model, and weight averaging takes its first copy at the first step, after that.
    """
    spec = cfg.train.init_from
    if spec is None:
        return None, None
    blend = {"shrink": cfg.train.init_shrink, "perturb": cfg.train.init_perturb,
             "feature_values": feats.item_feature_values, "event_types": feats.event_types}
    if local is not None:
        return WarmStart(local, spec, feats.item_map, **blend), ModelRef(str(Path(spec).resolve()))
    if nothing_promoted(tracker, spec):  # the first night(s) of a fresh registry: nothing to start from yet
        log.warning("train.init_from %s: the registry %s has no promoted %r model yet (a first run): training from "
                    "scratch; later runs start from it once a version is promoted", spec, tracker.uri,
                    tracker.registered_model)
        return None, None
    ref, files = fetch_model(tracker, spec, tmp)
    return WarmStart(load_trained_model(files), spec, feats.item_map, **blend), ref
