"""Integration fixtures: a real `coe serve` process on a free port with the real packaged experts."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, base_url: str, log: Path):
        self.process, self.base_url, self.log = process, base_url, log

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(tmp_path: Path, config_text: str | None, extra_args: tuple[str, ...] = ()) -> Server:
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    args = [sys.executable, "-m", "coe", "serve", "--port", str(port), "--log-level", "warning", *extra_args]
    if config_text is not None:
        config = tmp_path / "coe.yaml"
        config.write_text(config_text)
        args += ["--config", str(config)]
    log = tmp_path / "server.log"
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"coe serve exited early:\n{log.read_text()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"coe serve did not answer /health in {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    if server.alive():
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@contextmanager
def running(tmp_path: Path, config_text: str | None, extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    server = start_server(tmp_path, config_text, extra_args)
    try:
        yield server
    finally:
        stop_server(server)


TWO_EXPERTS = """
experts:
  - name: smollm2-135m
    source: smollm2-135m
  - name: gemma3-270m
    source: gemma3-270m
router:
  default_expert: smollm2-135m
"""
SMOLLM_CONFIG = TWO_EXPERTS + """server:
  max_tokens_limit: 2048
"""


@pytest.fixture(scope="module")
def smollm_server(tmp_path_factory):
    """The real SmolLM2 (and Gemma base) experts behind a real server process."""
    with running(tmp_path_factory.mktemp("smollm"), SMOLLM_CONFIG) as server:
        yield server


ROUTED_CONFIG = TWO_EXPERTS + "  pins: {code: gemma3-270m}\n"  # router section last: tests append to it


@pytest.fixture
def routed_config() -> str:
    return ROUTED_CONFIG


@pytest.fixture(scope="module")
def routed_server(tmp_path_factory):
    """Model "coe" routed by the trained default router; code is pinned to Gemma."""
    with running(tmp_path_factory.mktemp("routed"), ROUTED_CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """`coe serve` with no config: the built-in default of four packaged experts."""
    with running(tmp_path_factory.mktemp("default"), None) as server:
        yield server


@pytest.fixture
def two_experts() -> str:
    """Config text with the SmolLM2 and Gemma experts; tests append sections after it."""
    return TWO_EXPERTS


LOAD_CONFIG = TWO_EXPERTS + """
scheduler:
  max_batch_size: 8
  max_queue: 256
server:
  max_tokens_limit: 2048
"""


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    """Two small experts, batching up to 8, for concurrent-client tests."""
    with running(tmp_path_factory.mktemp("load"), LOAD_CONFIG) as server:
        yield server


@pytest.fixture(scope="session")
def coe_home() -> Path:
    """The same COE_HOME the CLI uses, where `make setup` assembled the packaged models."""
    from coe.cli import coe_home as home

    return home()


@pytest.fixture
def server_with_config(tmp_path):
    """Start `coe serve` with a given config text; every server started is stopped afterwards."""
    started: list[Server] = []

    def start(config_text: str | None) -> Server:
        server = start_server(tmp_path / f"server{len(started)}", config_text)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture(scope="module")
def two_expert_config(tmp_path_factory) -> Path:
    """A config file with the SmolLM2 and Gemma experts, for CLI commands."""
    path = tmp_path_factory.mktemp("config") / "coe.yaml"
    path.write_text(TWO_EXPERTS)
    return path
