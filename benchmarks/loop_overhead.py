"""The training loop's own cost per step: a model so small that its arithmetic is negligible, trained by
:func:`recsys.training.train_model` (Lightning, callbacks, optimiser, data path), so that milliseconds per step
are what any model pays on top of its arithmetic on this machine.

    python -m benchmarks.loop_overhead [--epochs 4] [--threads 1] [--json-out F] [KEY=VALUE ...]

Synthetic planted sequences (2,000 users, 5-15 items each out of 50, each next item the successor of the
last), d = 8, one block, batch 8, max length 16: 250 steps per epoch. Prints each epoch's training time
(validation excluded) and the median milliseconds per step over the epochs after the first, and the
milliseconds per epoch spent outside the epochs (fit wall time less the epochs' training + validation:
start-up and, above all, the checkpoint writes between epochs; ``--items 3416 model.hidden=128
model.n_blocks=4 model.n_heads=2`` gives the ML-1M model's checkpoint size, to weigh
``train.checkpoint_interval_s``). The script
depends only on ``recsys.training.train_model`` and ``recsys.config.build_config``, so the same file can be
run against an older commit for a before/after (copy it into that checkout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.machine import append_record
from features.synthetic import planted_sequences
from recsys.config import build_config
from recsys.training import train_model

N_USERS, N_ITEMS = 2000, 50


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--items", type=int, default=N_ITEMS, help="catalogue size (the embedding table's rows)")
    p.add_argument("--json-out", type=Path)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train.* / model.* values, e.g. train.batch_size=16")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tree: dict[str, dict] = {
        "model": {"max_len": 16, "hidden": 8, "n_blocks": 1, "n_heads": 1, "dropout": 0.1},
        "train": {"batch_size": 8, "val_batch_size": 256, "lr": 5e-3, "progress": False, "patience": a.epochs,
                  "max_epochs": a.epochs, "accelerator": "cpu"},
    }
    for kv in a.overrides:
        key, value = kv.split("=", 1)
        section, name = key.split(".", 1)
        tree[section][name] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(build_config(tree), planted_sequences(N_USERS, a.items, seed=1), a.items, Path(tmp))
    train_s = [h["train_s"] for h in result.history]
    steps = -(-N_USERS // tree["train"]["batch_size"])
    record = {"epoch_train_s": train_s, "steps_per_epoch": steps,
              "step_ms_median": 1000 * statistics.median(train_s[1:] or train_s) / steps,
              "between_epochs_ms": 1000 * (result.wall_time_s - result.history[-1]["elapsed_s"]) / len(train_s),
              "items": a.items,
              "threads": a.threads, "overrides": a.overrides, "torch": torch.__version__}
    print(json.dumps(record))
    append_record(a.json_out, record)
    return record


if __name__ == "__main__":
    main()
