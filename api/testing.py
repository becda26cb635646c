"""A real server process on a free local port, for end-to-end tests and benchmarks (never for production)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def live_server(
    env: dict[str, str], *, log_path: Path, startup_timeout_s: float = 180.0,
    command: tuple[str, ...] = ("-m", "api.server"),
) -> Iterator[LiveServer]:  # fmt: skip
    """Start ``python -m api.server`` (uvicorn; or ``command``, e.g. ``-m api serve``) on 127.0.0.1:<free port>
    with ``env`` added; stop it after."""
    port = free_port()
    full_env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"} | env
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *command, "--host", "127.0.0.1", "--port", str(port)],
            env=full_env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
        try:
            _wait_ready(server, startup_timeout_s)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: LiveServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout_s} s:\n{server.log()}")


def ingest_through(
    server: LiveServer, token: str, source: str, collection: str, timeout_s: float = 60.0
) -> dict:
    """Submit a server-side ingest job and wait for it to finish; returns the finished job (status checked)."""
    auth = {"Authorization": f"Bearer {token}"}
    job = httpx.post(
        server.url + "/v1/ingest-jobs", json={"source": source, "collection": collection}, headers=auth
    ).json()
    deadline = time.monotonic() + timeout_s
    while (state := httpx.get(server.url + job["job_url"], headers=auth).json())["status"] not in (
        "done",
        "failed",
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ingest job did not finish in {timeout_s} s: {state}")
        time.sleep(0.2)
    if state["status"] != "done":
        raise RuntimeError(f"the ingest job failed: {state}")
    return dict(state)
