"""A real MLflow tracking server for the registry tests, started once per session and torn down after.

``mlflow server --backend-store-uri sqlite:///<tmp>/mlflow.db --artifacts-destination <tmp>/artifacts``:
with artifact serving on (the default in MLflow 3), new experiments get the root ``mlflow-artifacts:/`` and
every upload and download goes through the server's HTTP API, as a remote team server would have it.
(``--default-artifact-root <tmp>/artifacts`` instead would hand clients a plain local path that they write
to directly, bypassing the server: it only works when client and server share a disk.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_START_TIMEOUT_S = 120


@dataclass(frozen=True)
class MlflowServer:
    url: str
    root: Path


def free_port() -> int:
    """A TCP port nothing listens on (bound then released; nobody else is expected to grab it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (the CLI and its uvicorn worker), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # No background job runner (prompt optimisation etc.): one process fewer and a faster start.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: torn down as a whole
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server on {url} did not come up (exit {proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield MlflowServer(url, root)
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def fsync_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every ``os.fsync`` (as ``("fsync", path of the descriptor)``) and ``os.replace`` (``("replace", src, dst)``)
    from now on, in order; both still happen. What a power-cut test checks without a power cut: that what a
    marker vouches for is made durable before the marker."""
    events: list[tuple[str, ...]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events
