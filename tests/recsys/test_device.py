"""evaluate.device / candidates.device: values, resolution, the missing-GPU error, and exact float32 scoring."""

from __future__ import annotations

import pytest
import torch

from recsys.config import ConfigError, load_config
from recsys.device import exact_float32, inference, resolve_device
from recsys.evaluation import evaluate_model_blocked, evaluate_scorer, model_scorer
from tests.recsys.test_topk import _DotModel, _eval_set

KEYS = ("evaluate.device", "candidates.device")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("key", KEYS)
def test_default_is_auto_and_the_accepted_values_load(key: str) -> None:
    section, name = key.split(".")
    assert getattr(getattr(load_config(), section), name) == "auto"
    for value in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["gpu", "CPU", "cuda:-1", "cuda:x", "mps", "cuda:0,1", "''"])
def test_unknown_values_are_rejected_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    assert f"{key}: must be auto, cpu, cuda or cuda:N" in str(err.value)


def test_auto_is_the_cpu_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto", "evaluate.device") == torch.device("cpu")
    assert resolve_device("cpu", "evaluate.device") == torch.device("cpu")


def test_auto_is_cuda_when_torch_sees_a_gpu(one_gpu: None) -> None:
    assert resolve_device("auto", "evaluate.device") == torch.device("cuda")
    assert resolve_device("cuda:0", "evaluate.device") == torch.device("cuda:0")


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_names_the_key_and_the_fix(no_cuda: None, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_device(value, key)
    message = str(err.value)
    assert f"{key} is '{value}'" in message and "no CUDA GPU" in message
    assert f"{key}=auto" in message and f"{key}=cpu" in message


def test_a_gpu_index_past_the_last_gpu_is_rejected(one_gpu: None) -> None:
    with pytest.raises(ConfigError, match=r"candidates.device is 'cuda:1' but torch sees 1 CUDA GPU\(s\), cuda:0"):
        resolve_device("cuda:1", "candidates.device")


def test_exact_float32_turns_autocast_and_tf32_off_for_the_block_only() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (a @ b).dtype == torch.bfloat16
            with exact_float32(torch.device("cpu")):
                assert (a @ b).dtype == torch.float32
                assert torch.get_float32_matmul_precision() == "highest"
            assert (a @ b).dtype == torch.bfloat16
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_evaluation_ranks_in_float32_under_an_enclosing_autocast() -> None:
    """Under bf16 autocast the scores would tie and the pessimistic ranks drop; the metrics must not move."""
    torch.manual_seed(0)
    n_items = 700
    model, es = _DotModel(n_items, dim=32), _eval_set(90, n_items)
    want = evaluate_scorer(model_scorer(model), es, n_items, (1, 10, 50), batch_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert evaluate_scorer(model_scorer(model), es, n_items, (1, 10, 50), batch_size=32) == want
        assert evaluate_model_blocked(model, es, n_items, (1, 10, 50), 32, 100) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_cuda_equals_the_cpu_on_exact_scores() -> None:
    """Integer embeddings: every score is exact in float32 on either device, so the metrics are equal."""
    n_items = 700
    model, es = _DotModel(n_items, dim=16), _eval_set(90, n_items)
    with torch.no_grad():
        model.emb.weight.copy_(torch.randint(-8, 9, model.emb.weight.shape, generator=torch.Generator().manual_seed(3)))
    ks = (1, 10, 50)
    want = evaluate_scorer(model_scorer(model), es, n_items, ks, batch_size=32)
    model.to(resolve_device("cuda", "evaluate.device"))
    assert evaluate_scorer(model_scorer(model), es, n_items, ks, batch_size=32) == want
    assert evaluate_model_blocked(model, es, n_items, ks, 32, 100) == want


def test_inference_scores_without_grad_in_eval_mode_and_restores_the_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    model.train()
    x = torch.ones(2, 4)
    with inference(model) as device:
        assert device == torch.device("cpu") and not model.training
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2) and not y1.requires_grad  # no dropout, no graph
    assert model.training  # the caller's mode is back
