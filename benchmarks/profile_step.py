"""Where one training step's time goes: a bare PyTorch loop over the system's own step, with torch.profiler.

    python -m benchmarks.profile_step --features work/bench/ml-1m-seed42/features [--config conf/benchmarks/ml-1m.yaml]
                                      [--steps 40] [--warmup 5] [--device cuda] [--json-out F]
                                      [--trainer-epochs N] [KEY=VALUE ...]

Loads a feature set written by the features job (``sequences.parquet`` and ``manifest.json``), builds the
model, the data module and the loss exactly as training does (:class:`recsys.system.SASRecSystem`,
:class:`recsys.data.SequenceDataModule`, the config file plus overrides), and runs ``--steps`` optimiser
steps of the training batches outside Lightning (forward, loss, backward, AdamW step), batches moved to the
device as the loader gives them. Prints, and appends to ``--json-out``: milliseconds per step (mean and
median, synchronised), steps per epoch and the bare epoch time they imply, and the profiler's ten most
expensive operators (self device time on CUDA, self CPU time otherwise). The gap between the bare epoch and
the epoch Lightning reports (``train_s`` in the train report) is the training loop's own overhead; the
operator table says whether a step is bound by arithmetic or by launches and synchronisations.
``--trainer-epochs N`` also trains N epochs with :func:`recsys.training.train_model` (Lightning, the same
config, no tracking) and reports its milliseconds per training step: each epoch's training time without
validation over its steps, median over the epochs after the first (the first pays start-up and compiling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.machine import append_record
from features.artifacts import FeatureSet, load_features
from pipelines.train import model_attributes
from recsys.config import load_config
from recsys.data import SequenceDataModule
from recsys.system import SASRecSystem
from recsys.training import resolve_hardware, train_model

ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, required=True, help="a features directory of the features job")
    p.add_argument("--config", type=Path, default=ROOT / "conf" / "benchmarks" / "ml-1m.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--trainer-epochs", type=int, default=0, help="also time N epochs of Lightning training")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    device = torch.device(a.device)
    _, precision = resolve_hardware("gpu" if device.type == "cuda" else "cpu", cfg.train.precision)
    feats = load_features(a.features)
    n_items, sequences = feats.n_items, feats.sequences
    t = cfg.train
    data = SequenceDataModule(sequences, n_items, cfg.model.max_len, t.batch_size, t.val_batch_size, t.seed,
                              t.window_stride, t.group_by_length, t.static_shapes)
    system = SASRecSystem.from_config(cfg, n_items, model_attributes(cfg, feats)).to(device)
    system.set_item_counts(data.item_counts)
    system.train()
    optimizer = torch.optim.AdamW(system.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    loader = data.train_dataloader()
    batches = iter(())

    def step() -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # a new pass over the windows
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = system._train_loss(*system._training_inputs(batch))
        loss.backward()
        optimizer.step()

    for _ in range(a.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(min(a.steps, 10)):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=10)
    steps_per_epoch = len(loader)
    result = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "precision": precision, "overrides": a.overrides, "config": str(a.config),
        "batch_size": t.batch_size, "n_items": n_items, "train_rows": len(data.train_rows),
        "step_ms_mean": 1000 * statistics.fmean(times), "step_ms_median": 1000 * statistics.median(times),
        "steps_per_epoch": steps_per_epoch,
        "bare_epoch_s": statistics.fmean(times) * steps_per_epoch,
    }
    if a.trainer_epochs:
        result |= _trainer_step_ms(a, feats, steps_per_epoch)
    print(table)
    print(json.dumps(result))
    append_record(a.json_out, result | {"profile": table})
    return result


def _trainer_step_ms(a: argparse.Namespace, feats: FeatureSet, steps: int) -> dict:
    """Milliseconds per step of Lightning training (train time of an epoch without validation / steps)."""
    accelerator = "gpu" if a.device.startswith("cuda") else "cpu"
    overrides = [*a.overrides, f"train.max_epochs={a.trainer_epochs}", f"train.patience={a.trainer_epochs}",
                 f"train.accelerator={accelerator}", "train.progress=false"]
    cfg = load_config(a.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        report = train_model(cfg, feats.sequences, feats.n_items, Path(tmp),
                             attributes=model_attributes(cfg, feats))
    per_epoch = [row["train_s"] for row in report.history]
    later = per_epoch[1:] or per_epoch
    return {"trainer_epoch_train_s": per_epoch, "trainer_step_ms_median": 1000 * statistics.median(later) / steps}


if __name__ == "__main__":
    main()
