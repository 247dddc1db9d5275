"""Safe loading: a model file or checkpoint that carries code is refused and its code never runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.checkpoint import resume_point
from recsys.model import SASRec, load_model, save_model
from recsys.storage import DamagedFileError


class _Payload:
    """Unpickling this object creates ``path``: the proof that arbitrary code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_model_weights_carrying_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    save_model(SASRec(10, 5, 8, 1, 1, 0.0), tmp_path / "model")
    torch.save({"item_emb.weight": _Payload(marker)}, tmp_path / "model" / "model.pt")
    with pytest.raises(DamagedFileError, match="model.pt is damaged and cannot be read \\(UnpicklingError: Weights only"):
        load_model(tmp_path / "model")  # refused by the weights-only unpickler, named as the file to replace
    assert not marker.exists()


def test_checkpoint_carrying_code_is_not_resumed(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 3, "stamp": _Payload(marker)}, tmp_path / "last.ckpt")
    assert resume_point(tmp_path, "any-identity") is None
    assert not marker.exists()
    assert not (tmp_path / "last.ckpt").exists()  # removed, the run starts clean


def test_yaml_config_uses_the_safe_loader(tmp_path: Path) -> None:
    from recsys.config import ConfigError, load_config

    marker = tmp_path / "code-ran"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"work_dir: !!python/object/apply:pathlib.Path.touch [['{marker}']]\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    assert not marker.exists()
