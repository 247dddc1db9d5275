"""A work directory whose path holds glob characters (`run[1]`, `a*b`, `q?`) is a path, not a pattern: Polars
expands such paths by default, so `recsys train` in `run[1]` silently trained on the sibling `run1`'s features
(and evaluate / candidates failed with "expanded paths were empty")."""

from __future__ import annotations

from pipelines.cli import EXIT_OK, main
from tests.pipelines.conftest import tiny


def test_a_work_dir_named_like_a_glob_reads_its_own_features(tmp_path) -> None:
    from features.artifacts import load_features

    mine, sibling = tmp_path / "run[1]", tmp_path / "run1"
    assert main(["features", "--quiet", *tiny(mine)]) == EXIT_OK
    assert main(["features", "--quiet", *tiny(sibling, "data.synthetic.n_users=300", "data.synthetic.seed=99")]) \
        == EXIT_OK
    feats = load_features(mine / "features")
    assert feats.sequences.height == feats.user_map.height == feats.n_users == 200
    for job in (["train"], ["evaluate"], ["candidates", "--date", "2024-05-01"]):
        assert main([job[0], "--quiet", *job[1:], *tiny(mine)]) == EXIT_OK, job
    assert main(["features", "--quiet", *tiny(tmp_path / "a*b?", "features.partitions=2")]) == EXIT_OK
