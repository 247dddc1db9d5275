"""benchmarks.sequential: a row is the protocol's test numbers of one resolved config, one record per seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.sequential import check_protocol, check_tested_once, resume_date, settings_hash, table_row
from recsys.config import load_config

CONF = Path(__file__).resolve().parent.parent / "conf" / "benchmarks" / "ml-1m.yaml"


def _record(seed: int, **extra) -> dict:
    train = {"best_epoch": 3, "epochs_run": 5, "seconds_per_epoch": 2.0, "train_seconds_per_epoch": 1.5,
             "best_val_ndcg_at_10": 0.2 + seed / 1000, "wall_time_s": 10.0}
    return {"date": "2026-12-05", "dataset": "ml-1m", "tag": "t", "seed": seed, "config": "c.yaml",
            "overrides": [], "wall_s": 12.0, "train": train, "hardware": "cpu", "commit": "abc",
            "results": {"model": {"ndcg_at_10": 0.2 + seed / 100, "hr_at_10": 0.3}}, **extra}


def test_the_settings_hash_ignores_seed_budget_and_paths_but_not_the_model():
    base = settings_hash(load_config(CONF, ["train.seed=1", "work_dir=a", "data.path=x/ml-1m.txt"]))
    assert settings_hash(load_config(CONF, ["train.seed=2", "work_dir=b", "data.path=y/ml-1m.txt",
                                            "train.max_time_s=60", "train.progress=true"])) == base
    assert settings_hash(load_config(CONF, ["train.seed=1", "model.n_blocks=2"])) != base


@pytest.mark.parametrize("overrides", [["evaluate.split=val"], ["evaluate.exclude_seen=false", "train.exclude_seen=false"],
                                       ["features.split=time", "features.val_cutoff=5", "features.test_cutoff=9"]])
def test_a_run_off_the_protocol_is_refused_before_training(overrides):
    with pytest.raises(ValueError, match="not the protocol of ../shared/PROTOCOL.md"):
        check_protocol(load_config(CONF, overrides))
    check_protocol(load_config(CONF))


def test_a_row_refuses_a_repeated_seed_and_mixed_settings_and_lists_every_commit():
    assert "| 42,43 (n=2, below the protocol's 3) |" in table_row([_record(42), _record(43)])  # flagged, not hidden
    assert "| 42,43,44 |" in table_row([_record(42), _record(43), _record(44)])
    with pytest.raises(ValueError, match="a seed comes twice"):
        table_row([_record(42), _record(42)])
    with pytest.raises(ValueError, match="2 different resolved configs"):
        table_row([_record(42, config_sha256="a"), _record(43, config_sha256="b")])
    row = table_row([_record(42, commit="abc"), _record(43, commit="def"), _record(44, commit="abc")])
    assert row.endswith("| cpu | abc / def |")


def test_a_resumed_seed_counts_all_its_training_and_no_partial_total():
    resumed = _record(43)
    resumed["train"] |= {"resumed_from_epoch": 4, "wall_time_s": 0.5,
                         "history": [{"elapsed_s": 100.0}, {"elapsed_s": 210.0}]}
    cells = table_row([_record(42), resumed]).split(" | ")
    assert cells[-4:-2] == [f"{(10.0 + 210.0) / 2:.0f}", "—"]  # train s from the history; total unknown


def test_resume_finds_the_checkpoints_of_this_config_of_any_date(tmp_path: Path) -> None:
    """--resume used today's date and the full config: a run killed yesterday, or resumed with another override,
    retrained from scratch without a word."""
    import datetime as dt

    from pipelines.schedule import checkpoint_dir

    cfg = load_config(None, [f"work_dir={tmp_path}", "train.max_time_s=60"])
    with pytest.raises(ValueError, match=r"--resume: no checkpoint of this config .* pass the same --config"):
        resume_date(cfg)
    for day in (dt.date(2026, 12, 4), dt.date(2026, 12, 3)):
        checkpoint_dir(cfg, day).mkdir(parents=True)
    other = load_config(None, [f"work_dir={tmp_path}", "model.hidden=32"])
    checkpoint_dir(other, dt.date(2026, 12, 6)).mkdir(parents=True)  # another config, later
    assert resume_date(cfg) == dt.date(2026, 12, 4)
    assert resume_date(load_config(None, [f"work_dir={tmp_path}", "train.max_time_s=9000"])) == dt.date(2026, 12, 4)
    with pytest.raises(ValueError, match="no checkpoint of this config"):
        resume_date(load_config(None, [f"work_dir={tmp_path}", "train.lr=0.01"]))
    # an evaluation key decides nothing of the training: the same checkpoints
    assert resume_date(load_config(None, [f"work_dir={tmp_path}", "evaluate.batch_size=7"])) == dt.date(2026, 12, 4)


def test_a_tag_seed_and_settings_are_scored_on_test_once() -> None:
    """ML-1M seed 43 was scored on test twice under one config (budgets 1900 s and 9000 s): now refused."""
    earlier = [{"tag": "ml", "seed": 43, "config_sha256": "abc", "tested": True, "date": "2026-12-01", "commit": "c"},
               {"tag": "ml", "seed": 44, "config_sha256": "abc", "tested": False}]
    with pytest.raises(ValueError, match=r"ml seed 43 with these settings was already scored on the test split on "
                                         r"2026-12-01 .* scored once per chosen model"):
        check_tested_once(earlier, "ml", 43, "abc")
    check_tested_once(earlier, "ml", 44, "abc")  # validation only so far
    check_tested_once(earlier, "ml", 43, "other settings")
    check_tested_once(earlier, "ml2", 43, "abc")


def test_a_scale_benchmarks_measurements_become_one_json_line(tmp_path) -> None:
    """eval_scale / candidates_scale / features_scale kept no record of their rows: --json-out writes one."""
    import json
    from typing import NamedTuple

    import numpy as np
    import torch

    from benchmarks.machine import emit, jsonable

    class Tuning(NamedTuple):
        parameter: str
        value: int

    r = {"tuning": Tuning("nprobe", 64), "load": (0.5, 1.25), "rss_gb": np.float64(1.39), "done": np.int64(10),
         "device": torch.device("cpu"), "out": tmp_path / "x", "metrics": {"ndcg_at_10": torch.tensor(0.25).item()}}
    out = tmp_path / "rec.jsonl"
    emit(jsonable({"bench": "eval_scale", **r}), out, [])
    (line,) = out.read_text().splitlines()
    got = json.loads(line)
    assert got["tuning"] == {"parameter": "nprobe", "value": 64} and got["load"] == [0.5, 1.25]
    assert (got["rss_gb"], got["done"], got["device"], got["out"]) == (1.39, 10, "cpu", str(tmp_path / "x"))
    assert {"machine", "commit", "date", "load_1min"} <= set(got)


def test_a_json_out_that_cannot_be_written_stops_before_the_measuring(tmp_path) -> None:
    from benchmarks.machine import check_json_out

    check_json_out(tmp_path / "rec.jsonl")
    check_json_out(None)
    with pytest.raises(SystemExit, match="directory .*missing does not exist"):
        check_json_out(tmp_path / "missing" / "rec.jsonl")


def test_the_six_network_file_resolves_to_the_settings_its_records_ran_with() -> None:
    """The #3 row (Beauty, BERT4Rec file) ran as beauty-bert4rec.yaml plus KEY=VALUE overrides; its own file must
    resolve to exactly those settings, or rerunning the file would not reproduce the recorded row."""
    import json

    root = CONF.parent.parent.parent
    records = [json.loads(line) for line in
               (root / "benchmarks/results/2026-12-06-cpu-beauty-bert4rec-ens6-cos25.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in records) == [42, 43, 44]
    own = settings_hash(load_config(CONF.parent / "beauty-bert4rec-ens6.yaml"))
    for r in records:
        assert settings_hash(load_config(root / r["config"], r["overrides"])) == own
    # and the file is not the base file: dropping any one override changes the settings
    base = records[0]["overrides"]
    for i, override in enumerate(base):
        if not override.startswith("train.max_time_s="):
            assert settings_hash(load_config(root / records[0]["config"], base[:i] + base[i + 1:])) != own, override
