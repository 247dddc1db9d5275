"""train_model resumes only its own run's checkpoint, and a finished (early-stopped) run stays finished.

The SIGKILL tests of the whole `recsys train` job are in tests/pipelines/test_faults.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from recsys.checkpoint import BEST, EXTRA_KEY, IDENTITY_KEY, AtomicCheckpointIO, resume_point, run_identity
from recsys.config import EvaluateConfig
from recsys.training import seed_step_generators, train_model
from tests.recsys.test_system import planted_sequences, small_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("interval", [None, 3600.0])
def test_an_early_stopped_run_is_not_trained_further_on_resume(tmp_path: Path, interval: float | None) -> None:
    # An lr far below float32 resolution leaves the weights, hence val NDCG, unchanged: stops after epoch 1.
    # With a checkpoint interval longer than the run, last.ckpt is still written at the stopping epoch.
    seqs = planted_sequences(120, 40)
    cfg = small_config(max_epochs=6, patience=1, lr=1e-30, checkpoint_interval_s=interval)
    first = train_model(cfg, seqs, 40, tmp_path)
    assert first.epochs_run == 2 and first.resumed_from_epoch is None
    steps = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    again = train_model(cfg, seqs, 40, tmp_path)  # as after a crash between training and the marker
    assert again.resumed_from_epoch == 1 and again.epochs_run == 2
    assert again.best_checkpoint == first.best_checkpoint
    # no optimiser step on resume (the weights cannot tell at this rate: the step count does)
    assert steps > 0 and torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == steps
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, caplog) -> None:
    seqs = planted_sequences(120, 40)
    train_model(small_config(max_epochs=1, seed=1), seqs, 40, tmp_path)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)[IDENTITY_KEY]
    with caplog.at_level(logging.WARNING, logger="recsys.checkpoint"):
        other = train_model(small_config(max_epochs=1, seed=2), seqs, 40, tmp_path)
    assert other.resumed_from_epoch is None
    assert "written by another run" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]


def test_the_time_budget_is_not_part_of_the_run_identity(tmp_path: Path) -> None:
    seqs = planted_sequences(120, 40)
    base = run_identity(small_config(max_epochs=2), seqs, 40)
    assert run_identity(small_config(max_epochs=2, max_time_s=5.0), seqs, 40) == base
    assert run_identity(small_config(max_epochs=2, checkpoint_interval_s=60.0), seqs, 40) == base
    assert run_identity(small_config(max_epochs=2, lr=2e-3), seqs, 40) != base
    # validation's ranking decides the best epoch: seen items competing is another run
    competing = small_config(max_epochs=2).model_copy(update={"evaluate": EvaluateConfig(exclude_seen=False)})
    assert run_identity(competing, seqs, 40) != base
    first = train_model(small_config(max_epochs=2), seqs, 40, tmp_path)
    # Continued under a budget: resumes the same run (finished, so nothing more is trained).
    again = train_model(small_config(max_epochs=2, max_time_s=3600.0), seqs, 40, tmp_path)
    assert again.resumed_from_epoch == 1 and again.epochs_run == 2
    assert again.best_checkpoint == first.best_checkpoint


def test_step_seeding_draws_what_torch_manual_seed_draws() -> None:
    """The step's reseed touches only the generators the step uses, and they draw as after torch.manual_seed."""
    torch.manual_seed(123)
    expected = (torch.rand(5), torch.randint(0, 1000, (5,)))
    torch.manual_seed(999)  # another state in between
    seed_step_generators(123, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected[0])
    assert torch.equal(torch.randint(0, 1000, (5,)), expected[1])


def _saved_epochs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(file name, epoch) of every checkpoint written from now on, in order."""
    saved: list[tuple[str, int]] = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):  # noqa: ANN001, ANN202
        saved.append((Path(path).name, int(checkpoint["epoch"])))
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    return saved


def test_a_checkpoint_interval_writes_last_ckpt_less_often_and_trains_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seqs = planted_sequences(120, 40)
    saved = _saved_epochs(monkeypatch)
    every = train_model(small_config(max_epochs=4), seqs, 40, tmp_path / "every")
    assert [e for name, e in saved if name == "last.ckpt"] == [0, 1, 2, 3]
    best_writes = [entry for entry in saved if entry[0] != "last.ckpt"]
    assert best_writes  # the best checkpoint is written on each improvement, whatever the interval
    saved.clear()
    # Longer than the run: written once, at the last epoch (max_epochs), so the finished run resumes as finished.
    sparse = train_model(small_config(max_epochs=4, checkpoint_interval_s=3600.0), seqs, 40, tmp_path / "sparse")
    assert [e for name, e in saved if name == "last.ckpt"] == [3]
    assert [entry for entry in saved if entry[0] != "last.ckpt"] == best_writes
    a, b = every.model.state_dict(), sparse.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # how often the resume point is written changes nothing
    assert every.best_epoch == sparse.best_epoch
    again = train_model(small_config(max_epochs=4, checkpoint_interval_s=3600.0), seqs, 40, tmp_path / "sparse")
    assert again.resumed_from_epoch == 3 and again.epochs_run == 4


def test_resuming_removes_best_checkpoints_written_after_the_resume_point(tmp_path: Path) -> None:
    """A kill after a best-epoch file but before last.ckpt (or between two interval writes) leaves a best
    checkpoint the resumed run does not know; Lightning would version its rewrite (-v1) and keep both."""
    seqs, cfg = planted_sequences(120, 40), small_config(max_epochs=2)
    first = train_model(cfg, seqs, 40, tmp_path)
    later = tmp_path / f"{BEST}005.ckpt"
    later.write_bytes(first.best_checkpoint.read_bytes())
    point = resume_point(tmp_path, run_identity(cfg, seqs, 40))
    assert point is not None and point.epoch == 1
    assert not later.exists()
    assert first.best_checkpoint.is_file()  # the best at or before the resume point stays


def test_a_run_cut_by_its_time_budget_goes_on_under_a_larger_one_and_stays_cut_under_the_same(
    tmp_path: Path,
) -> None:
    """The README's promise: a run stopped by train.max_time_s resumes under a larger budget and trains on
    (before: the saved stop flag ended it at once); under the same budget a rerun changes nothing."""
    seqs = planted_sequences(120, 40)
    cut = train_model(small_config(max_epochs=4, max_time_s=1e-3), seqs, 40, tmp_path)
    assert cut.epochs_run == 1  # stopped after its first step, that epoch validated
    same = train_model(small_config(max_epochs=4, max_time_s=1e-3), seqs, 40, tmp_path)
    assert same.resumed_from_epoch == 0 and same.epochs_run == 1 and same.best_checkpoint == cut.best_checkpoint
    # fit_s, the budget's clock, goes on over the resume (it restarted at 0, so a cut run seemed to have used only
    # part of its budget): the cut epoch's fit_s set to 1000 s in its checkpoint, the next epochs come after it
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    (timer,) = [v for k, v in state["callbacks"].items() if "_EpochTimer" in k]
    timer["history"][-1]["fit_s"] = 1000.0
    torch.save(state, tmp_path / "last.ckpt")
    more = train_model(small_config(max_epochs=4, max_time_s=3600.0), seqs, 40, tmp_path)
    assert more.resumed_from_epoch == 0 and more.epochs_run == 4
    fit_s = [row["fit_s"] for row in more.history]
    assert fit_s[0] == 1000.0 and all(a < b for a, b in zip(fit_s, fit_s[1:], strict=False))
    unlimited = train_model(small_config(max_epochs=4), seqs, 40, tmp_path)  # finished at max_epochs: stays so
    assert unlimited.resumed_from_epoch == 3 and unlimited.epochs_run == 4


def test_a_kill_between_a_new_best_file_and_last_ckpt_keeps_the_best_that_last_ckpt_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after epoch E's best-epochE.ckpt but before E's last.ckpt: the rerun resumes from E - 1, whose
    last.ckpt names the previous best file. It must still be there (before: replaced at once, and with
    best-epochE removed as later than the resume point, no best checkpoint was left)."""
    seqs, cfg = planted_sequences(120, 40), small_config(max_epochs=4)
    history = train_model(cfg, seqs, 40, tmp_path / "reference").history
    scores = [h["val_ndcg_at_10"] for h in history]
    e = next(i for i in range(1, len(scores)) if scores[i] > max(scores[:i]))  # an epoch that improved

    class Killed(Exception):
        pass

    save = AtomicCheckpointIO.save_checkpoint

    def killed_at_last(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt" and checkpoint["epoch"] == e:
            raise Killed
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", killed_at_last)
    with pytest.raises(Killed):
        train_model(cfg, seqs, 40, tmp_path / "run")
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    named = scores.index(max(scores[:e]))  # the best epoch up to the resume point: last.ckpt's best file
    assert (tmp_path / "run" / f"{BEST}{named:03d}.ckpt").is_file()
    ended = train_model(small_config(max_epochs=4, max_time_s=1e-3), seqs, 40, tmp_path / "run")  # end it now
    assert ended.resumed_from_epoch == e - 1 and ended.best_checkpoint.is_file()
    assert ended.best_val_ndcg >= max(scores[:e]) - 1e-6  # one more step was taken and validated
    assert sorted(p.name for p in (tmp_path / "run").glob(f"{BEST}*.ckpt")) == [ended.best_checkpoint.name]


def test_a_resumed_run_reports_the_warm_start_its_weights_began_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed, then rerun when train.init_from names another model (e.g. tonight's own, published before a
    later stage failed): the resumed weights are the first run's, so is the warm start report (before: the
    counts and source of the model the rerun loaded and then overwrote)."""
    import polars as pl

    from recsys.candidates import TrainedModel
    from recsys.model import SASRec
    from recsys.warmstart import WarmStart

    def source(n: int) -> TrainedModel:
        items = pl.DataFrame({"item_id": list(range(1, n + 1)), "item_idx": list(range(1, n + 1)),
                              "train_count": [1] * n}, schema={"item_id": pl.Int64, "item_idx": pl.Int32,
                                                              "train_count": pl.Int64})
        users = pl.DataFrame({"user_id": [1], "user_idx": [0]}, schema={"user_id": pl.Int64, "user_idx": pl.Int32})
        model = SASRec(n_items=n, max_len=16, hidden=32, n_blocks=1, n_heads=1, dropout=0.1)
        return TrainedModel(model, users, items)

    seqs, cfg = planted_sequences(120, 40), small_config(max_epochs=3)
    features_items = source(40).item_map

    class Killed(Exception):
        pass

    save = AtomicCheckpointIO.save_checkpoint

    def killed_at_last(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt" and checkpoint["epoch"] == 1:
            raise Killed
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", killed_at_last)
    with pytest.raises(Killed):
        train_model(cfg, seqs, 40, tmp_path, warm_start=WarmStart(source(20), "last-night", features_items),
                    warm_source={"uri": "last-night"})
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    again = train_model(cfg, seqs, 40, tmp_path, warm_start=WarmStart(source(40), "tonight", features_items),
                        warm_source={"uri": "tonight"})
    assert again.resumed_from_epoch == 0
    assert again.warm_start["uri"] == "last-night"
    assert again.warm_start["items_from_source"] == 20 and again.warm_start["items_new"] == 20
    # the resumed run's own checkpoints carry that report too, for a third try (before: the second try's source)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)[EXTRA_KEY]["warm_start"] == again.warm_start


def test_a_run_resumes_where_its_directory_is_reached_under_another_path(tmp_path: Path) -> None:
    """Lightning keeps absolute checkpoint paths: a work dir moved (or mounted elsewhere on the next machine)
    lost the best score on resume and kept the old best path (a finished run failed with FileNotFoundError)."""
    seqs, cfg = planted_sequences(120, 40), small_config(max_epochs=3)
    first = train_model(cfg, seqs, 40, tmp_path / "a" / "ckpt")
    (tmp_path / "a").rename(tmp_path / "b")
    again = train_model(cfg, seqs, 40, tmp_path / "b" / "ckpt")
    assert again.resumed_from_epoch == 2 and again.epochs_run == 3
    assert again.best_checkpoint == tmp_path / "b" / "ckpt" / first.best_checkpoint.name
    assert again.best_val_ndcg == first.best_val_ndcg and again.best_epoch == first.best_epoch
