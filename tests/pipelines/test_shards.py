"""`recsys candidates --shard i/N`: the union of the N shards is the unsharded night, row for row and score for
score; a shard rerun is idempotent and leaves the other shards alone; bad values and mixed layouts fail."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from pipelines.cli import EXIT_OK, EXIT_USAGE, main
from tests.hostile.cli_run import run_cli, snapshot
from tests.pipelines.conftest import leftovers, tiny, train_tiny

WHOLE = "2024-05-01"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_features: Path) -> Path:
    """A trained tiny work directory with the whole (unsharded) night of 2024-05-01."""
    work = train_tiny(tmp_path_factory.mktemp("shards") / "work", tiny_features)
    assert main(["candidates", "--quiet", "--date", WHOLE, *tiny(work)]) == EXIT_OK
    return work


def _shard(work: Path, date: str, i: int, n: int) -> int:
    return main(["candidates", "--quiet", "--date", date, "--shard", f"{i}/{n}", *tiny(work)])


def _night(work: Path, date: str, shard: str | None = None) -> Path:
    return work / "candidates" / (f"{shard}/date={date}" if shard else f"date={date}")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_union_of_the_shards_is_the_unsharded_night(trained: Path, n: int) -> None:
    date = f"2024-05-0{n + 1}"  # a night per split: one night is never split two ways
    for i in range(n):
        assert _shard(trained, date, i, n) == EXIT_OK
    assert not _night(trained, date).exists()
    shards = [_night(trained, date, f"shard={i}-of-{n}") for i in range(n)]
    whole = pl.read_parquet(_night(trained, WHOLE) / "candidates.parquet")
    union = pl.read_parquet(trained / "candidates" / f"shard=*-of-{n}" / f"date={date}" / "candidates.parquet")
    assert union.sort(["user_id", "rank"]).equals(whole)  # same rows, float32 scores and ranks: disjoint shards

    manifests = [json.loads((shard / "manifest.json").read_text()) for shard in shards]
    assert [m["shard"] for m in manifests] == [{"index": i, "count": n} for i in range(n)]
    assert sum(m["users"] for m in manifests) == whole["user_id"].n_unique() == 200
    assert sum(m["rows"] for m in manifests) == whole.height
    # the night before: split n - 1 ways if that parametrisation ran (in full), else the whole night of WHOLE
    before = f"2024-05-0{n}"
    earlier = [_night(trained, before, f"shard={i}-of-{n - 1}") for i in range(n - 1)]
    previous = (str(_night(trained, WHOLE)) if not earlier or not all(p.is_dir() for p in earlier)
                else str(earlier[0]) if n == 2 else str(trained / "candidates" / f"shard=*-of-{n - 1}" / f"date={before}"))
    for shard, manifest in zip(shards, manifests, strict=True):
        # Drift against the same users of the night before: same model, same features.
        drift = json.loads((shard / "drift.json").read_text())
        assert drift["previous"] == previous
        assert drift["users_previous"] == drift["users_today"] == manifest["users"]
        assert drift["mean_overlap_at_k"] == 1.0
    assert leftovers(trained) == []


def test_a_shard_rerun_is_idempotent_and_leaves_the_other_shards_alone(trained: Path) -> None:
    date = "2024-05-20"
    for i in range(2):
        assert _shard(trained, date, i, 2) == EXIT_OK
    before = snapshot(trained / "candidates")
    other = _night(trained, date, "shard=1-of-2") / "candidates.parquet"
    mtime = other.stat().st_mtime_ns
    assert _shard(trained, date, 0, 2) == EXIT_OK
    assert snapshot(trained / "candidates") == before
    assert other.stat().st_mtime_ns == mtime
    # Each shard has its own lock: N shards of a night can run at the same time.
    assert {"candidates.shard-0-of-2.lock", "candidates.shard-1-of-2.lock"} <= {
        p.name for p in (trained / ".locks").iterdir()}


def test_the_drift_gate_of_a_shard_compares_with_the_same_shard(trained: Path, capsys) -> None:
    assert _shard(trained, "2024-05-21", 0, 2) == EXIT_OK
    assert _shard(trained, "2024-05-22", 0, 2) == EXIT_OK
    drift = json.loads((_night(trained, "2024-05-22", "shard=0-of-2") / "drift.json").read_text())
    assert drift["previous"] == str(_night(trained, "2024-05-21", "shard=0-of-2"))
    # The shard's night before held items nobody would recommend: tonight's overlap with it is 0.
    fake = _night(trained, "2024-05-21", "shard=0-of-2") / "candidates.parquet"
    pl.read_parquet(fake).with_columns(pl.col("item_id") + 10**9).write_parquet(fake)
    published = snapshot(_night(trained, "2024-05-22", "shard=0-of-2"))
    outcome = run_cli(capsys, "candidates", "--quiet", "--date", "2024-05-22", "--shard", "0/2",
                      "candidates.min_overlap=0.5", *tiny(trained))
    assert outcome.code != EXIT_OK and "not published" in outcome.err
    rejected = trained / "candidates" / "rejected" / "shard=0-of-2" / "date=2024-05-22"
    assert json.loads((rejected / "drift.json").read_text())["passed"] is False
    assert snapshot(_night(trained, "2024-05-22", "shard=0-of-2")) == published


def test_after_a_change_of_shard_count_a_shard_compares_with_the_last_complete_night(trained: Path) -> None:
    """Split 2 ways on 06-10, then 4 ways: shard 0/4 compares with the union of 06-10's 2 shards (it used to skip
    them and compare with the whole night of 05-01, or none); a split night with a shard missing is skipped."""
    for i in range(2):
        assert _shard(trained, "2024-06-10", i, 2) == EXIT_OK
    assert _shard(trained, "2024-06-11", 0, 4) == EXIT_OK
    drift = json.loads((_night(trained, "2024-06-11", "shard=0-of-4") / "drift.json").read_text())
    assert drift["previous"] == str(trained / "candidates" / "shard=*-of-2" / "date=2024-06-10")
    assert drift["users_previous"] == drift["users_today"] > 0 and drift["mean_overlap_at_k"] == 1.0
    assert _shard(trained, "2024-06-12", 0, 3) == EXIT_OK  # 1 of 3 shards: not a complete night
    assert _shard(trained, "2024-06-13", 0, 5) == EXIT_OK
    drift = json.loads((_night(trained, "2024-06-13", "shard=0-of-5") / "drift.json").read_text())
    assert drift["previous"] == str(trained / "candidates" / "shard=*-of-2" / "date=2024-06-10")


@pytest.mark.parametrize("value", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3"])
def test_a_bad_shard_is_a_usage_error_naming_the_flag(trained: Path, capsys, value: str) -> None:
    outcome = run_cli(capsys, "candidates", "--date", "2024-05-11", f"--shard={value}", *tiny(trained))
    assert outcome.code == EXIT_USAGE
    assert "argument --shard" in outcome.err and "expected i/N with 0 <= i < N" in outcome.err
    assert not list((trained / "candidates").glob("*/date=2024-05-11"))


def test_a_night_is_never_written_two_ways(trained: Path, capsys) -> None:
    assert _shard(trained, "2024-05-12", 0, 2) == EXIT_OK
    other_split = run_cli(capsys, "candidates", "--date", "2024-05-12", "--shard", "0/3", *tiny(trained))
    assert other_split.code == EXIT_USAGE and "already split another way (shard=0-of-2" in other_split.err
    assert "--shard 0/3" in other_split.err
    whole = run_cli(capsys, "candidates", "--date", "2024-05-12", *tiny(trained))
    assert whole.code == EXIT_USAGE and "run with --shard, or remove them" in whole.err
    onto_whole = run_cli(capsys, "candidates", "--date", WHOLE, "--shard", "0/2", *tiny(trained))
    assert onto_whole.code == EXIT_USAGE and "holds the whole night" in onto_whole.err
    assert [p.parent.name for p in (trained / "candidates").glob("*/date=2024-05-12")] == ["shard=0-of-2"]


def test_the_shards_of_a_night_come_from_one_model(trained: Path, tiny_features: Path, tmp_path: Path,
                                                   capsys) -> None:
    """A promotion, rollback or retraining between the shards' starts must not give a night of two models."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_features, other / "features")
    assert main(["train", "--quiet", *tiny(other, "train.max_epochs=2")]) == EXIT_OK  # other weights
    assert _shard(trained, "2024-05-23", 0, 2) == EXIT_OK
    mixed = run_cli(capsys, "candidates", "--quiet", "--date", "2024-05-23", "--shard", "1/2",
                    "--model", str(other / "model"), *tiny(trained))
    assert mixed.code == EXIT_USAGE and "shard=0-of-2 was scored with model" in mixed.err
    assert f"shard 1/2 would use {(other / 'model').resolve()}" in mixed.err and "--model models:/" in mixed.err
    assert not _night(trained, "2024-05-23", "shard=1-of-2").exists()
    assert _shard(trained, "2024-05-23", 1, 2) == EXIT_OK  # the night's model: fine
    manifests = [json.loads((_night(trained, "2024-05-23", f"shard={i}-of-2") / "manifest.json").read_text())
                 for i in range(2)]
    assert manifests[0]["model"]["weights_sha256"] == manifests[1]["model"]["weights_sha256"]
    assert len(manifests[0]["model"]["weights_sha256"]) == 64


def test_a_night_published_one_way_while_another_way_scores_is_not_published_twice(
    trained: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layout is checked at the start and again before publishing: a shard that published while a whole
    run was scoring (the jobs' locks differ) stops the whole run."""
    import pipelines.generate_candidates as job

    score = job.generate_candidates

    def shard_published_meanwhile(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        monkeypatch.setattr(job, "generate_candidates", score)
        assert _shard(trained, "2024-05-24", 0, 2) == EXIT_OK
        return score(*args, **kwargs)

    monkeypatch.setattr(job, "generate_candidates", shard_published_meanwhile)
    whole = run_cli(capsys, "candidates", "--quiet", "--date", "2024-05-24", *tiny(trained))
    assert whole.code == EXIT_USAGE and "already split into shards (shard=0-of-2" in whole.err
    assert not (_night(trained, "2024-05-24") / "candidates.parquet").exists()


def _marker(work: Path, date: str) -> Path:
    return work / "candidates" / "complete" / f"date={date}.json"


def test_a_night_is_marked_complete_once_all_its_shards_are_published(trained: Path) -> None:
    date = "2024-05-25"
    assert _shard(trained, date, 2, 3) == EXIT_OK
    assert _shard(trained, date, 0, 3) == EXIT_OK
    assert not _marker(trained, date).exists()  # shard 1 still missing
    assert _shard(trained, date, 1, 3) == EXIT_OK
    marker = json.loads(_marker(trained, date).read_text())
    whole = pl.read_parquet(_night(trained, WHOLE) / "candidates.parquet")
    assert marker["layout"] == "3 shards" and marker["date"] == date
    assert [part["path"] for part in marker["parts"]] == [f"shard={i}-of-3/date={date}" for i in range(3)]
    assert marker["rows"] == whole.height and marker["users"] == 200
    manifest = json.loads((_night(trained, date, "shard=1-of-3") / "manifest.json").read_text())
    assert marker["model"] == manifest["model"]
    assert marker["features_manifest_sha256"] == manifest["features"]["manifest"]["sha256"]
    before = _marker(trained, date).read_bytes()
    assert _shard(trained, date, 0, 3) == EXIT_OK  # a rerun with the same model rewrites it byte for byte
    assert _marker(trained, date).read_bytes() == before
    # The whole night is marked too, so a consumer waits for one file whatever the layout.
    assert json.loads(_marker(trained, WHOLE).read_text())["layout"] == "whole"
    assert leftovers(trained) == []


def test_shards_published_in_the_same_instant_from_two_models_leave_the_night_unmarked(
    trained: Path, tiny_features: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks before scoring and publishing cannot see a shard that publishes in the same instant: the
    completion check, after publishing, reads every shard's manifest and refuses to mark a mixed night."""
    import shutil

    import pipelines.generate_candidates as job

    other = tmp_path / "other"
    shutil.copytree(tiny_features, other / "features")
    assert main(["train", "--quiet", *tiny(other, "train.max_epochs=2")]) == EXIT_OK  # other weights
    date = "2024-05-26"
    assert _shard(trained, date, 0, 2) == EXIT_OK
    monkeypatch.setattr(job, "_check_same_night", lambda *args: None)  # what a same-instant race looks like
    mixed = run_cli(capsys, "candidates", "--quiet", "--date", date, "--shard", "1/2",
                    "--model", str(other / "model"), *tiny(trained))
    assert mixed.code == EXIT_USAGE
    assert "2 published shards were scored with 2 different model(s)" in mixed.err and "not marked complete" in mixed.err
    assert not _marker(trained, date).exists()
    assert _shard(trained, date, 1, 2) == EXIT_OK  # rerun with the night's model: now complete
    assert json.loads(_marker(trained, date).read_text())["layout"] == "2 shards"


def test_shards_of_one_night_with_another_k_or_allow_list_are_refused(
    trained: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shards of a night checked only the model and the features: a shard run with another K, seen items
    competing, or an allow list updated between the shards' starts was published and the night marked complete,
    its users filtered by two catalogues."""
    import pipelines.generate_candidates as job

    date = "2024-05-27"
    allow = tmp_path / "allowed.csv"
    allow.write_text("item_id\n" + "\n".join(str(i) for i in range(1, 41)) + "\n")
    assert main(["candidates", "--quiet", "--date", date, "--shard", "0/2",
                 *tiny(trained, f"candidates.allowed_items={allow}")]) == EXIT_OK
    published = snapshot(trained / "candidates")
    for extra, says in [(["candidates.k=3"], "candidates.k 5 → 3"),
                        (["candidates.exclude_seen=false"], "candidates.exclude_seen True → False"),
                        ([], "candidates.allowed_items_sha256 ")]:
        if not extra:  # the same file, rewritten with fewer items (the stock file of the next hour)
            allow.write_text("item_id\n" + "\n".join(str(i) for i in range(1, 11)) + "\n")
        got = run_cli(capsys, "candidates", "--quiet", "--date", date, "--shard", "1/2",
                      *tiny(trained, f"candidates.allowed_items={allow}", *extra))
        assert got.code == EXIT_USAGE, got.err
        assert "scored with other settings" in got.err and says in got.err, got.err
        assert snapshot(trained / "candidates") == published  # nothing published, no marker
    # the same race as for models: both shards publish in the same instant, the completion check refuses
    monkeypatch.setattr(job, "_check_same_night", lambda *args: None)
    mixed = run_cli(capsys, "candidates", "--quiet", "--date", date, "--shard", "1/2",
                    *tiny(trained, f"candidates.allowed_items={allow}"))
    assert mixed.code == EXIT_USAGE and "other settings (candidates.allowed_items_sha256" in mixed.err, mixed.err
    assert not _marker(trained, date).exists()
    monkeypatch.undo()
    allow.write_text("item_id\n" + "\n".join(str(i) for i in range(1, 41)) + "\n")  # back to the night's list
    assert main(["candidates", "--quiet", "--date", date, "--shard", "1/2",
                 *tiny(trained, f"candidates.allowed_items={allow}")]) == EXIT_OK
    marker = json.loads(_marker(trained, date).read_text())
    assert marker["layout"] == "2 shards" and marker["night_settings"]["k"] == 5
    # a shard published by the previous version (no night_settings in its manifest): the settings its other
    # fields hold are compared, so the upgrade night is checked too
    old = _night(trained, date, "shard=0-of-2") / "manifest.json"
    manifest = json.loads(old.read_text())
    del manifest["night_settings"]
    old.write_text(json.dumps(manifest))
    got = run_cli(capsys, "candidates", "--quiet", "--date", date, "--shard", "1/2",
                  *tiny(trained, f"candidates.allowed_items={allow}", "candidates.k=3"))
    assert got.code == EXIT_USAGE and "candidates.k 5 → 3" in got.err, got.err


def test_a_night_published_before_a_failure_is_still_marked_and_status_says_what_is_missing(
    trained: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow logging fails after the night is published: the job fails, but the night is there, so it is
    marked complete (before: published without its marker, consumers waiting for it forever). `recsys status`
    names what an unmarked latest night lacks: shards, or (whole night) the marker itself."""
    import pipelines.generate_candidates as job

    date = "2024-12-01"
    assert _shard(trained, date, 0, 2) == EXIT_OK
    assert "NOT complete (1 of 2 shards published)" in run_cli(capsys, "status", *tiny(trained)).out
    later = "2024-12-02"

    def broken(*args, **kwargs):
        raise RuntimeError("tracking server gone")

    monkeypatch.setattr(job, "_track", broken)
    assert main(["candidates", "--quiet", "--date", later, *tiny(trained)]) != EXIT_OK
    assert (_night(trained, later) / "manifest.json").is_file()
    assert json.loads(_marker(trained, later).read_text())["layout"] == "whole"
    assert f"latest night {later}" in run_cli(capsys, "status", *tiny(trained)).out
    _marker(trained, later).unlink()  # e.g. a job killed between publishing and marking
    out = run_cli(capsys, "status", *tiny(trained)).out
    assert "NOT complete (completion marker missing: rerun recsys candidates for that night)" in out


def test_a_shards_drift_baseline_keeps_its_users_across_a_user_id_type_change(tmp_path: Path) -> None:
    """Last night written with text user ids, tonight's with numbers (data.user_id_type changed): the shard's
    baseline holds the previous lists of tonight's shard users (by their ids in tonight's type), so identical
    lists drift by nothing; the text id that is no number belongs to no shard."""
    from pipelines.generate_candidates import _previous_lists
    from recsys.drift import drift_report
    from recsys.sharding import Shard, in_shard

    night = tmp_path / "date=2024-01-01"
    night.mkdir()
    users = list(range(200))
    rows = {"item_id": [10, 20] * 200, "score": [1.0, 0.5] * 200, "rank": [1, 2] * 200}
    types = {"item_id": pl.Int64, "score": pl.Float32, "rank": pl.Int32}
    previous = pl.DataFrame({"user_id": [str(u) for u in users for _ in range(2)], **rows},
                            schema={"user_id": pl.String, **types})
    pl.concat([previous, pl.DataFrame({"user_id": ["u7"], "item_id": [10], "score": [1.0], "rank": [1]},
                                      schema=previous.schema)]).write_parquet(night / "candidates.parquet")
    shard = Shard(0, 2)
    today = pl.DataFrame({"user_id": [u for u in users for _ in range(2)], **rows}, schema={"user_id": pl.Int64, **types})
    today = today.filter(in_shard(shard, pl.Int64))
    mine = today["user_id"].unique().sort().to_list()
    assert 50 < len(mine) < 150  # the premise: a real split
    baseline = _previous_lists([night], shard, pl.Int64)
    assert sorted(int(u) for u in baseline["user_id"].unique()) == mine
    report = drift_report(today, baseline, 2)
    assert (report["users_common"], report["users_lost"], report["users_gained"]) == (len(mine), 0, 0)
    assert report["mean_overlap_at_k"] == 1.0 and report["new_items"] == 0



def test_a_shard_reads_the_whole_previous_night_after_a_user_id_type_change(tmp_path: Path) -> None:
    """Its own shard's previous partition, written with the other id type, held other users (text ids hash by
    BLAKE2b, numbers by splitmix64): compared with it, about half of tonight's users counted as gained and the
    new-item share was measured against half of last night's lists."""
    import datetime as dt

    from pipelines.generate_candidates import _previous_parts
    from pipelines.workdir import WorkDir
    from recsys.config import load_config

    wd = WorkDir.of(load_config(None, [f"work_dir={tmp_path / 'work'}"]))
    table = pl.DataFrame({"user_id": ["1", "2"], "item_id": [10, 20], "score": [1.0, 0.5], "rank": [1, 1]},
                         schema={"user_id": pl.String, "item_id": pl.Int64, "score": pl.Float32, "rank": pl.Int32})
    for index in (0, 1):
        part = wd.candidates / f"shard={index}-of-2" / "date=2024-01-01"
        part.mkdir(parents=True)
        table.write_parquet(part / "candidates.parquet")
    day, mine = dt.date(2024, 1, 2), "shard=0-of-2"
    assert _previous_parts(wd, day, mine, pl.String) == [wd.candidates / mine / "date=2024-01-01"]  # same type
    assert sorted(_previous_parts(wd, day, mine, pl.Int64)) == [
        wd.candidates / f"shard={i}-of-2" / "date=2024-01-01" for i in (0, 1)]
