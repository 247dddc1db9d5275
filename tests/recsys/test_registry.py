"""The promotion gate's rule (the MLflow side runs against a real server in tests/pipelines)."""

from __future__ import annotations

import pytest

from recsys.registry import decide, is_mlflow_uri


@pytest.mark.parametrize(
    "challenger, champion, tolerance, has_champion, promoted",
    [
        (0.10, None, 0.0, False, True),  # first model
        (0.30, 0.30, 0.0, True, True),  # a tie is promoted
        (0.29, 0.30, 0.0, True, False),
        (0.29, 0.30, 0.02, True, True),  # within the tolerance
        (0.27, 0.30, 0.02, True, False),
        (0.90, None, 0.0, True, False),  # a champion with no recorded number is never replaced automatically
    ],
)
def test_gate_rule(challenger, champion, tolerance, has_champion, promoted):
    ok, reason = decide(challenger, champion, tolerance, has_champion)
    assert ok is promoted and reason


@pytest.mark.parametrize(
    "spec, remote",
    [("models:/sasrec@champion", True), ("models:/sasrec/3", True), ("runs:/abc/model", True),
     ("work/demo/model", False), ("/abs/model", False), ("./m:odel", False)],
)
def test_model_spec_kind(spec, remote):
    assert is_mlflow_uri(spec) is remote
