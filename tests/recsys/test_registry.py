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


class _Page(list):
    def __init__(self, items, token):
        super().__init__(items)
        self.token = token


class _PagedClient:
    """A registry whose search answers ``per_page`` versions a call, as MLflow's does past its page size."""

    def __init__(self, versions, per_page: int = 2):
        self.versions, self.per_page, self.calls = versions, per_page, 0

    def search_model_versions(self, filter_string=None, page_token=None):
        self.calls += 1
        start = int(page_token or 0)
        end = start + self.per_page
        return _Page(self.versions[start:end], str(end) if end < len(self.versions) else None)


def test_registry_searches_read_every_page():
    """A nightly registry passes a search's page size (10,000 versions on SQLite) after years: the gate's count of
    versions kept out in a row and the reuse of a registered content read every page, not the first."""
    from types import SimpleNamespace

    from recsys.registry import _kept_out_in_a_row
    from recsys.tracking import all_pages

    versions = [SimpleNamespace(version=str(v), tags={"promotion.promoted": "false"}) for v in range(1, 8)]
    client = _PagedClient(versions)
    assert [mv.version for mv in all_pages(client.search_model_versions, filter_string="x")] == \
        [str(v) for v in range(1, 8)] and client.calls == 4
    # champion v1; v2..v6 kept out before, v7 now: 6 in a row, 3 of them past the first page
    assert _kept_out_in_a_row(_PagedClient(versions), "m", "1", "7") == 6
