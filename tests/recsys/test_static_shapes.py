"""train.static_shapes (training batches max_len wide) and train.compile (forward + loss through torch.compile):
the same losses and weights as trimmed, eager training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from recsys.config import build_config
from recsys.data import PAD, SequenceDataModule
from recsys.system import SASRecSystem
from recsys.training import train_model
from tests.recsys.test_system import planted_sequences, small_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.usefixtures("one_thread")]

N_ITEMS, MAX_LEN = 30, 16


def train_losses(static_shapes: bool, steps: int = 6) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of ``steps`` SGD steps (fp32, CPU, no dropout) through the system's own training step.

    Not AdamW: the key bias has a zero true gradient (softmax ignores a shift shared by all keys), and Adam
    scales the float noise around zero, which differs with the batch width, into full-size steps.
    """
    dm = SequenceDataModule(planted_sequences(60, N_ITEMS), N_ITEMS, MAX_LEN, batch_size=16, seed=3,
                            static_shapes=static_shapes)
    torch.manual_seed(0)
    system = SASRecSystem(n_items=N_ITEMS, max_len=MAX_LEN, hidden=16, n_blocks=2, dropout=0.0,
                          label_smoothing=0.1)
    optimizer = torch.optim.SGD(system.parameters(), lr=0.5)
    losses = []
    for _, batch in zip(range(steps), (b for _ in range(steps) for b in dm.train_dataloader()), strict=False):
        assert batch["inputs"].shape[1] == MAX_LEN if static_shapes else batch["inputs"].shape[1] <= MAX_LEN
        optimizer.zero_grad()
        loss = system._train_loss(batch["inputs"], batch["targets"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, system.state_dict()


def test_static_shapes_train_with_the_same_losses_and_weights() -> None:
    trimmed, trimmed_weights = train_losses(static_shapes=False)
    static, static_weights = train_losses(static_shapes=True)
    torch.testing.assert_close(static, trimmed)
    for key, value in trimmed_weights.items():
        torch.testing.assert_close(static_weights[key], value, msg=key)


def test_static_batches_carry_the_trimmed_rows_max_len_wide() -> None:
    def rows(static_shapes: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        dm = SequenceDataModule(planted_sequences(50, N_ITEMS), N_ITEMS, MAX_LEN, batch_size=8,
                                static_shapes=static_shapes)
        out = []
        for batch in dm.train_dataloader():
            assert (batch["inputs"].shape[1] == MAX_LEN) == static_shapes or batch["inputs"].shape[1] == MAX_LEN
            for inp, tgt in zip(batch["inputs"].tolist(), batch["targets"].tolist(), strict=True):
                out.append((tuple(x for x in inp if x != PAD), tuple(x for x in tgt if x != PAD)))
        return out

    assert rows(True) == rows(False)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU (inductor) needs a C++ compiler, none on PATH")
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    # 64 users in batches of 16: every step has the one static shape, so the step compiles once.
    seqs = planted_sequences(64, N_ITEMS, seed=4)

    def run(compile_step: bool, name: str) -> tuple[list[dict[str, float]], torch.Tensor]:
        tree = small_config(max_epochs=2, batch_size=16, static_shapes=True, compile=compile_step).to_dict()
        tree["model"]["dropout"] = 0.0  # compiled dropout draws other masks than eager
        result = train_model(build_config(tree), seqs, N_ITEMS, tmp_path / name)
        histories = SequenceDataModule(seqs, N_ITEMS, MAX_LEN).val_inputs.long()  # (64, MAX_LEN)
        with torch.no_grad():
            scores = result.model.score(result.model.user_vectors(histories))  # (64, N_ITEMS + 1)
        return result.history, scores

    eager_history, eager = run(False, "eager")
    compiled_history, compiled = run(True, "compiled")
    # Scores, not weights: AdamW turns the float noise around the key bias's zero gradient into steps that
    # differ between any two builds of the step, and that bias changes no output.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert [h["val_ndcg_at_10"] for h in compiled_history] == pytest.approx(
        [h["val_ndcg_at_10"] for h in eager_history], abs=1e-6)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_torch_compile_and_the_step_uses_the_compiled_function(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def fake_compile(fn, mode: str):  # records the mode, returns a wrapper that counts its calls
        seen.append(mode)
        return lambda *args: (seen.append("called"), fn(*args))[1]

    monkeypatch.setattr("recsys.system.torch.compile", fake_compile)
    cfg = small_config(static_shapes=True, compile=True).to_dict()
    cfg["train"]["compile_mode"] = mode
    system = SASRecSystem.from_config(build_config(cfg), N_ITEMS)
    batch = next(iter(SequenceDataModule(planted_sequences(16, N_ITEMS), N_ITEMS, MAX_LEN, batch_size=8,
                                         static_shapes=True).train_dataloader()))
    for _ in range(2):
        system._train_loss(batch["inputs"], batch["targets"])
    assert seen == [mode, "called", "called"]  # compiled once, in the configured mode


def test_compile_mode_rejects_an_unknown_mode() -> None:
    cfg = small_config().to_dict()
    cfg["train"]["compile_mode"] = "fast"
    with pytest.raises(ValueError, match="compile_mode"):
        build_config(cfg)
