"""Shared fixtures: collectors in-process on port 0, and real processes on free ports."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.collector.state import Liveness
from gpufleet.ports import free_port
from tests.mqtt_broker import Broker
from tests.postgres_server import PostgresServer, postgres

ROOT = Path(__file__).resolve().parent.parent


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 10.0, ca: Path | None = None
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def wait_until(
    predicate: object, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last_error}" if last_error else ""))


async def until(predicate: object, timeout: float = 15.0, what: str = "condition") -> None:
    """Wait on the event loop until ``predicate()`` holds; fail (never carry on) after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def local_config(**changes: Any) -> CollectorConfig:
    """A collector's settings for a test: loopback, free ports, a short shutdown grace."""
    settings: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "shutdown_grace_s": 0.1,
    }
    return CollectorConfig(**{**settings, **changes})


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Exactly these GPUFLEET_* variables set (and no other of ours) while the block runs."""
    saved = {key: value for key, value in os.environ.items() if key.startswith("GPUFLEET_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def metric(collector: Collector, name: str, **labels: str) -> float:
    """A sample of the collector's own metrics, by its exposed name (0 when not there yet)."""
    return collector.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    """A collector in this process, on free ports."""
    service = Collector(
        CollectorConfig(
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_host="127.0.0.1",
            http_port=0,
            liveness=Liveness(3, 10),
            shutdown_grace_s=0.5,
        )
    )
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto on a free port, for this test."""
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def postgresql(tmp_path: Path) -> Iterator[PostgresServer]:
    """A private PostgreSQL for this test, that it may stop, kill, restart and cut off."""
    with postgres(tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def postgresql_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL for a module's tests: each makes its own `database(name)`, and leaves it running."""
    with postgres(tmp_path_factory.mktemp("postgresql")) as server:
        yield server


class Processes:
    """Real subprocesses of the project's entry points; all killed at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, module: str, *args: str, name: str | None = None) -> subprocess.Popen[bytes]:
        log = (self._log_dir / f"{name or module}-{len(self.started)}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        self.started.append(process)
        return process

    def sim_fleet(self, *args: str) -> subprocess.Popen[bytes]:
        """`gpufleet-agent --source sim` with ``args`` (nodes, interval, collector, faults...)."""
        return self.start("gpufleet.agent.main", "--source", "sim", *args, name="agent")

    def log(self, process: subprocess.Popen[bytes]) -> str:
        index = self.started.index(process)
        return "\n".join(p.read_text() for p in self._log_dir.glob(f"*-{index}.log"))

    def collector(
        self,
        *extra: str,
        grpc_port: int | None = None,
        http_port: int | None = None,
        tls_ca: Path | None = None,
    ) -> tuple[subprocess.Popen[bytes], str, str]:
        """Start gpufleet-collector; return it, its gRPC target and its base URL once ready.

        Its database is this test's collector.db unless ``extra`` names another, so a
        collector started again (on the same ports) finds the fleet of the one before.
        """
        grpc_port, http_port = grpc_port or free_port(), http_port or free_port()
        if "--db" not in extra:
            extra = ("--db", str(self._log_dir / "collector.db"), *extra)
        process = self.start(
            "gpufleet.collector.main",
            "--grpc-listen",
            f"127.0.0.1:{grpc_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            *extra,
        )
        base = f"https://localhost:{http_port}" if tls_ca else f"http://127.0.0.1:{http_port}"
        wait_until(lambda: http_get(f"{base}/readyz", timeout=1, ca=tls_ca)[0] == 200, what="collector ready")
        return process, f"127.0.0.1:{grpc_port}", base

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
