"""`recsys train train.init_from=…`: training starts from the earlier model's weights (checked through the
validation metric of an epoch whose updates are too small to move a weight), the report says what was
carried over, and a missing or incompatible source stops the job with exit 2 before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from tests.pipelines.conftest import tiny, train_tiny

# One epoch at a learning rate far below float32 resolution of the weights: AdamW's step leaves every weight
# as it was, so the epoch's validation measures the initial weights.
FROZEN = ["train.lr=1e-12", "train.max_epochs=1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    return train_tiny(tmp_path_factory.mktemp("warm-source") / "work", tiny_features)


def _report(work: Path) -> dict:
    return json.loads((work / "model" / "train_report.json").read_text())


def test_training_starts_from_the_earlier_models_weights(source, new_work):
    best = _report(source)["best_val_ndcg_at_10"]
    warm, scratch = new_work("warm"), new_work("scratch")
    init = f"train.init_from={source / 'model'}"
    assert main(["train", "--quiet", *tiny(warm), *FROZEN, init]) == EXIT_OK
    assert main(["train", "--quiet", *tiny(scratch), *FROZEN]) == EXIT_OK

    report = _report(warm)
    assert report["history"][0]["val_ndcg_at_10"] == best  # the source's best checkpoint, measured again
    assert _report(scratch)["history"][0]["val_ndcg_at_10"] < best - 0.1  # a random start is far below
    n_items = report["n_items"]
    assert report["warm_start"] == {"uri": str((source / "model").resolve()), "name": None, "version": None,
                                    "alias": None, "run_id": None, "items_from_source": n_items,
                                    "items_new": 0, "source_items_dropped": 0, "shrink": 1.0, "perturb": 0.0}
    assert _report(scratch)["warm_start"] is None


def test_a_missing_source_stops_the_job_before_it_writes_anything(new_work, capsys):
    work = new_work()
    code = main(["train", "--quiet", *tiny(work), f"train.init_from={work / 'nowhere'}"])
    assert code == EXIT_USAGE
    assert f"{work / 'nowhere' / 'model.pt'} does not exist" in capsys.readouterr().err
    assert not (work / "model").exists() and not (work / "checkpoints").exists()


def test_another_architecture_stops_the_job_naming_the_keys(source, new_work, capsys):
    work = new_work()
    code = main(["train", "--quiet", *tiny(work), "model.hidden=32", f"train.init_from={source / 'model'}"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "train.init_from" in err and "model.hidden is 16 there, 32 here" in err
    assert not (work / "model").exists()
