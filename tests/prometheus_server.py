"""A real Prometheus server (Debian package `prometheus`) scraping our collector."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpufleet.ports import free_port
from gpufleet.signals import terminate
from tests.conftest import http_get, wait_until


class PrometheusServer:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expression: str) -> list[dict[str, Any]]:
        status, body, _ = http_get(f"{self.url}/api/v1/query?query={urllib.parse.quote(expression)}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def scalar(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def range(self, expression: str, start: float, end: float, step: float) -> list[float]:
        """The values of a one-series expression from ``start`` to ``end`` (Unix seconds)."""
        query = urllib.parse.urlencode({"query": expression, "start": start, "end": end, "step": step})
        status, body, _ = http_get(f"{self.url}/api/v1/query_range?{query}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", answer
        result = answer["data"]["result"]
        return [float(value) for _, value in result[0]["values"]] if result else []


@contextmanager
def prometheus(
    tmp_path: Path, scrape_configs: str, rule_files: Sequence[Path] = ()
) -> Iterator[PrometheusServer]:
    """Prometheus scraping and evaluating every second, with these scrape jobs and rule files."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise AssertionError("prometheus not found: run the tests with `make test`, which installs it")
    config = tmp_path / "prometheus.yml"
    rules = "".join(f"  - {json.dumps(str(path))}\n" for path in rule_files)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + f"scrape_configs:\n{scrape_configs}"
    )
    port = free_port()
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with _running(command, tmp_path / "prometheus.log", f"http://127.0.0.1:{port}", "/-/ready") as server:
        yield server


@contextmanager
def _running(command: list[str], log_path: Path, url: str, ready: str) -> Iterator[PrometheusServer]:
    """A time-series server as a child process, ready when ``ready`` answers 200; stopped on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: http_get(f"{url}{ready}", timeout=1)[0] == 200, what=f"{command[0]} ready")
            yield PrometheusServer(url)
        finally:
            terminate(process)


@contextmanager
def victoria_metrics(tmp_path: Path, scrape_configs: str) -> Iterator[PrometheusServer]:
    """VictoriaMetrics (Debian package `victoria-metrics`) scraping every second with these jobs.

    It answers PromQL at the same API as Prometheus; queries see the newest samples at once
    (no latency offset), and a target that stops answering is marked stale at its next scrape.
    """
    binary = shutil.which("victoria-metrics")
    if binary is None:
        raise AssertionError("victoria-metrics not found: run the tests with `make test`, which installs it")
    config = tmp_path / "scrape.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{scrape_configs}")
    port = free_port()
    command = [
        binary,
        f"-promscrape.config={config}",
        f"-storageDataPath={tmp_path / 'vm-data'}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-search.latencyOffset=0s",
        "-search.disableCache",
    ]
    with _running(
        command, tmp_path / "victoria-metrics.log", f"http://127.0.0.1:{port}", "/health"
    ) as server:
        yield server
