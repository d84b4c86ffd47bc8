"""The benchmark's processes: the collector, the load generators and probes, and how they are stopped."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import fleet
from bench.procstat import cpu_seconds, memory_bytes
from gpufleet import wire
from gpufleet.collector.exposition import shard_of
from gpufleet.ports import free_port
from gpufleet.v1 import ingest_pb2, query_pb2, query_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
INGEST_METHOD = "/gpufleet.v1.IngestService/Connect"
REPORTS_METRIC = "gpufleet_collector_reports_total"
STREAMS_METRIC = "gpufleet_collector_agent_streams"
# Per-peer limits that let one load generator stand in for a whole fleet of hosts.
ONE_PEER_FLEET = ("--max-streams-per-peer", "200000", "--registration-burst-per-peer", "200000")


@dataclass(frozen=True)
class Settings:
    quick: bool
    sizes: tuple[int, ...]  # GPUs
    baselines: bool
    shards_at_100k: int = 32
    seed: int = 0

    @property
    def window_s(self) -> float:
        """How long CPU per report is measured over."""
        return 10.0 if self.quick else 20.0

    @property
    def scrapes(self) -> int:
        return 3 if self.quick else 5

    @property
    def probes(self) -> int:
        return 15 if self.quick else 40


class Failure(Exception):
    """The benchmark cannot go on (a process died, a wait timed out)."""


# -- processes -----------------------------------------------------------------------------


class Children:
    """Every process the benchmark starts; all stopped on the way out, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._processes: list[subprocess.Popen[bytes]] = []
        self._kept: list[subprocess.Popen[bytes]] = []

    def keep(self, *processes: subprocess.Popen[bytes]) -> None:
        """Leave these running through ``stop_all`` (until ``stop_everything``)."""
        for process in processes:
            self._processes.remove(process)
            self._kept.append(process)

    def start(
        self, name: str, args: list[str], stdin: bool = False, stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else log,
            stderr=log,
            cwd=self.workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        )
        self._processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stop_all(self) -> None:
        for process in reversed(self._processes):
            self.stop(process, timeout=10.0)
        self._processes.clear()

    def stop_everything(self) -> None:
        self.stop_all()
        for process in self._kept:
            self.stop(process, timeout=10.0)
        self._kept.clear()


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, grpc.RpcError, ValueError):
            if predicate():
                return
        time.sleep(interval)
    raise Failure(f"timed out after {timeout:.0f} s waiting for {what}")


class Collector:
    """A gpufleet-collector process and the ways to look at it."""

    def __init__(
        self, children: Children, name: str, db: str | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        """``db``: the collector's --db (default: a SQLite file in the work directory); ``extra`` flags."""
        self.grpc_port, self.http_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.process = children.start(
            name,
            python(
                "gpufleet.collector.main",
                "--grpc-listen",
                self.target,
                "--http-listen",
                f"127.0.0.1:{self.http_port}",
                "--db",
                db or str(children.workdir / f"{name}.db"),
                "--log-level",
                "warning",
                # The whole simulated fleet comes from this one address.
                *ONE_PEER_FLEET,
                *extra,
            ),
        )
        self.log = children.workdir / f"{name}.log"
        self._http = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=120)
        wait_for("the collector to start", lambda: self.get("/readyz")[0] == 200, timeout=60)
        self.channel = grpc.insecure_channel(self.target, options=wire.CLIENT_OPTIONS)
        self.query = query_pb2_grpc.QueryServiceStub(self.channel)

    @property
    def pid(self) -> int:
        if self.process.poll() is not None:
            raise Failure(f"the collector exited ({self.process.returncode}); see {self.log}")
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_bytes(self.pid)

    def get(self, path: str, gzip: bool = False) -> tuple[int, bytes, dict[str, str]]:
        headers = {"Accept-Encoding": "gzip"} if gzip else {"Accept-Encoding": "identity"}
        for attempt in (1, 2):
            try:
                self._http.request("GET", path, headers=headers)
                response = self._http.getresponse()
                return response.status, response.read(), dict(response.getheaders())
            except (OSError, http.client.HTTPException):
                self._http.close()
                if attempt == 2:
                    raise
        raise AssertionError("not reached")

    def scrape(self, path: str, gzip: bool) -> tuple[float, float, int]:
        """(seconds to the last byte, collector CPU seconds, bytes) of one GET."""
        cpu = self.cpu()
        started = time.perf_counter()
        status, body, headers = self.get(path, gzip)
        elapsed = time.perf_counter() - started
        if status != 200:
            raise Failure(f"GET {path}: HTTP {status}: {body[:200]!r}")
        if gzip and headers.get("Content-Encoding") != "gzip":
            raise Failure(f"GET {path} with gzip: not gzip-encoded")
        return elapsed, self.cpu() - cpu, len(body)

    def head_length(self, path: str) -> int:
        self._http.request("HEAD", path, headers={"Accept-Encoding": "identity"})
        response = self._http.getresponse()
        response.read()
        return int(response.getheader("Content-Length") or 0)

    def metric(self, name: str) -> float:
        """One of the collector's own metrics (or the sum of a fleet aggregate)."""
        body = self.get("/metrics/fleet")[1]
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self._http.close()
        self.channel.close()


class LoadGenerators:
    """The fleet: bench/load.py processes (two, so the client side spreads over cores)."""

    def __init__(
        self, children: Children, target: str, nodes: int, interval_s: float, seed: int, *extra: str
    ) -> None:
        self.nodes = nodes
        self._status: list[dict[str, Any]] = []
        self._processes = []
        parts = 2 if nodes >= 200 else 1
        spread = min(max(nodes / 400, 1.0), 30.0)
        for part in range(parts):
            first, last = nodes * part // parts, nodes * (part + 1) // parts
            process = children.start(
                f"load-{nodes}-{part}",
                python(
                    "bench.load",
                    "--collector",
                    target,
                    "--nodes",
                    str(last - first),
                    "--offset",
                    str(first),
                    "--interval",
                    str(interval_s),
                    "--connect-spread",
                    str(spread),
                    "--seed",
                    str(seed),
                    *extra,
                ),
                stdin=True,
                stdout=True,
            )
            self._processes.append(process)
            self._status.append({})
            threading.Thread(target=self._read, args=(part, process), daemon=True).start()

    def _read(self, part: int, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with contextlib.suppress(ValueError):
                self._status[part] = json.loads(line)

    def status(self, key: str) -> int:
        return sum(int(status.get(key, 0)) for status in self._status)

    def last_error(self) -> str:
        return "; ".join(str(s.get("last_error")) for s in self._status if s.get("last_error"))

    def command(self, line: str) -> None:
        for process in self._processes:
            if process.poll() is not None:
                raise Failure(f"a load generator exited ({process.returncode})")
            assert process.stdin is not None
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self._processes if p.poll() is None)


class Probe:
    """One more node, driven from here: reports with a marker, to see when it shows."""

    def __init__(self, collector: Collector, seed: int, index: int, shards: int) -> None:
        self.collector = collector
        self.messages = fleet.NodeMessages(seed, index, 10.0, fleet.body_pool(seed, 10.0))
        self.hostname = fleet.hostname(index)
        self.shard = f"/metrics/nodes?shard={shard_of(self.messages.node_id, shards)}&shards={shards}"
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        connect = collector.channel.stream_stream(
            INGEST_METHOD, request_serializer=None, response_deserializer=None
        )
        self._responses = connect(iter(self._requests.get, None))
        self._requests.put(self.messages.hello)
        ack = ingest_pb2.CollectorMessage.FromString(next(self._responses))
        self.sequence = ack.hello_ack.last_acked_sequence

    def measure(self, mark: int, timeout: float = 10.0) -> tuple[float, float, float]:
        """Seconds from sending a report until acknowledged, in /metrics, in the query API."""
        self.sequence += 1
        message = ingest_pb2.AgentMessage.FromString(self.messages.report(self.sequence))
        message.report.gpus[0].pcie_replay_count = mark
        line = f'gpufleet_gpu_pcie_replays_total{{node="{self.hostname}",gpu="0"}} {mark}\n'.encode()
        request = query_pb2.GetNodeRequest(node=self.hostname)
        started = time.perf_counter()
        self._requests.put(message.SerializeToString())
        next(self._responses)
        acked = time.perf_counter() - started
        in_metrics = in_query = 0.0
        while not (in_metrics and in_query):
            if time.perf_counter() - started > timeout:
                raise Failure(f"report {mark} not visible after {timeout:.0f} s")
            if not in_metrics and line in self.collector.get(self.shard)[1]:
                in_metrics = time.perf_counter() - started
            if not in_query:
                answer = self.collector.query.GetNode(request, timeout=10)
                if answer.gpus and answer.gpus[0].sample.pcie_replay_count == mark:
                    in_query = time.perf_counter() - started
            time.sleep(0.005)
        return acked, in_metrics, in_query

    def close(self) -> None:
        self._requests.put(None)
