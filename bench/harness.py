"""The scale benchmark: a real collector process under simulated fleets, next to the baselines.

For each fleet size it starts `gpufleet-collector` (with its database), the load
generator (bench/load.py: one connection and agent stream per node), and then
measures the collector process from /proc: CPU seconds per report, scrape
latency and CPU, bytes per scrape, freshness, the query API, and RSS. The
baselines run on the same fleet in the same run (bench/baselines.py). A real
agent (`--source sim`) runs beside it all the while, to measure the agent as a
guest on a GPU node. Results go to stdout and to docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import fleet
from bench.load import raise_open_files_limit
from bench.procstat import cpu_seconds, load_average, median, memory_bytes, percentile
from collector.exposition import shard_of
from gpufleet import wire
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

    def __init__(self, children: Children, name: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.process = children.start(
            name,
            python(
                "collector.main",
                "--grpc-listen",
                self.target,
                "--http-listen",
                f"127.0.0.1:{self.http_port}",
                "--db",
                str(children.workdir / f"{name}.db"),
                "--log-level",
                "warning",
                # The whole simulated fleet comes from this one address.
                *ONE_PEER_FLEET,
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


# -- one fleet size ------------------------------------------------------------------------


class Scenario:
    def __init__(self, settings: Settings, children: Children, gpus: int) -> None:
        self.settings = settings
        self.children = children
        self.gpus = gpus
        self.nodes = gpus // fleet.GPUS_PER_NODE
        self.result: dict[str, Any] = {"gpus": gpus, "nodes": self.nodes}
        # The collector's CPU use under the steady load alone, taken off each scrape's CPU.
        self.background_cores = 0.0

    def say(self, message: str) -> None:
        print(f"[{self.gpus:>7,} GPUs] {message}", flush=True)

    def run(self) -> dict[str, Any]:
        collector = Collector(self.children, f"collector-{self.gpus}")
        load = None
        try:
            load = self._connect(collector)
            self._ingest(collector, load)
            if 500 < self.nodes <= 5_000:  # the load generators can outrun the collector here
                self._saturation(collector, load)
            if self.gpus <= 10_000:
                self._scrapes(collector, load, "/metrics", "metrics")
            else:
                self._shards(collector, load)
            self._fleet_view(collector)
            time.sleep(self.nodes / 1250)  # the rounds' backlog (store, acknowledgements) drains
            self._freshness(collector)
            self._queries(collector)
            self.result["collector_memory"] = collector.memory()
            if self.nodes <= 500:
                self._against_the_simulator(collector, load)
        finally:
            if load is not None:
                with contextlib.suppress(Failure):
                    load.command("quit")
            collector.close()
            self.children.stop_all()
        if self.settings.baselines and self.gpus <= 10_000:
            self._baselines()
        return self.result

    def _connect(self, collector: Collector) -> LoadGenerators:
        self.say(f"connecting {self.nodes:,} nodes (one gRPC connection each)")
        started = time.monotonic()
        load = LoadGenerators(self.children, collector.target, self.nodes, 10.0, self.settings.seed)
        wait_for(
            f"{self.nodes} agent streams",
            lambda: collector.metric(STREAMS_METRIC) >= self.nodes,
            timeout=60 + self.nodes / 100,
            interval=0.5,
        )
        self.result["connect_s"] = time.monotonic() - started
        self.result["connect_retries"] = load.status("errors")
        # Every node reports once now, so that the whole fleet is there; then one
        # interval for the steady load to settle.
        self._round(collector, load)
        self.say(f"connected in {self.result['connect_s']:.1f} s; the fleet reports every 10 s")
        time.sleep(10 + self.nodes / 1000)
        return load

    def _round(self, collector: Collector, load: LoadGenerators, settle_s: float = 0.5) -> None:
        """Every node reports now; returns once the collector took them all in."""
        before = collector.metric(REPORTS_METRIC)
        load.command("round")
        wait_for(
            "a round of reports",
            lambda: collector.metric(REPORTS_METRIC) >= before + self.nodes * 0.999,
            timeout=60 + self.nodes / 100,
            interval=0.2,
        )
        time.sleep(settle_s)

    def _window(self, collector: Collector, load: LoadGenerators, seconds: float) -> dict[str, float]:
        reports, cpu, load_cpu, started = (
            collector.metric(REPORTS_METRIC),
            collector.cpu(),
            load.cpu(),
            time.monotonic(),
        )
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        cpu, load_cpu = collector.cpu() - cpu, load.cpu() - load_cpu
        reports = collector.metric(REPORTS_METRIC) - reports
        return {
            "seconds": elapsed,
            "reports": reports,
            "reports_per_s": reports / elapsed,
            "cpu_s": cpu,
            "cores": cpu / elapsed,
            "cpu_us_per_report": cpu / max(reports, 1) * 1e6,
            "reports_per_core_s": reports / cpu if cpu else float("nan"),
            "load_generator_cores": load_cpu / elapsed,
        }

    def _ingest(self, collector: Collector, load: LoadGenerators) -> None:
        window = self._window(collector, load, self.settings.window_s)
        self.result["ingest"] = window
        self.background_cores = window["cores"]
        self.say(
            f"steady ingest: {window['reports_per_s']:.0f} reports/s, collector "
            f"{window['cores']:.3f} cores, {window['cpu_us_per_report']:.0f} us CPU/report"
        )

    def _saturation(self, collector: Collector, load: LoadGenerators) -> None:
        """As many reports as the load generators can send: 4 per node per second."""
        load.command("interval 0.25")
        time.sleep(2)
        window = self._window(collector, load, self.settings.window_s)
        load.command("interval 10")
        self.result["saturation"] = window
        self.result["grpc_floor"] = self._grpc_floor()
        self.say(
            f"saturation: {window['reports_per_s']:.0f} reports/s taken in, collector "
            f"{window['cores']:.2f} cores, {window['reports_per_core_s']:.0f} reports per CPU second"
        )
        time.sleep(2)

    def _against_the_simulator(self, collector: Collector, load: LoadGenerators) -> None:
        """The same rate from real agents (`gpufleet-agent --source sim`): does the replay cost the same?"""
        interval = 1.0
        load.command(f"interval {interval}")
        time.sleep(3)
        replayed = self._window(collector, load, self.settings.window_s)
        load.command("interval 0")
        agents = self.children.start(
            f"simulator-{self.gpus}",
            python(
                "agent.main",
                "--source",
                "sim",
                "--nodes",
                str(self.nodes),
                "--interval",
                str(interval),
                "--collector",
                collector.target,
                "--log-level",
                "warning",
            ),
        )
        try:
            streams = collector.metric(STREAMS_METRIC)
            wait_for(
                "the simulated agents",
                lambda: collector.metric(STREAMS_METRIC) >= streams + self.nodes,
                timeout=60,
            )
            time.sleep(min(interval, 5.0) + 2)
            agents_cpu = cpu_seconds(agents.pid)
            simulated = self._window(collector, load, self.settings.window_s)
            simulated["load_generator_cores"] = (cpu_seconds(agents.pid) - agents_cpu) / simulated["seconds"]
        finally:
            self.children.stop(agents)
        self.result["replay_vs_simulator"] = {"replayed": replayed, "simulated": simulated}
        self.say(
            f"same rate ({replayed['reports_per_s']:.0f} reports/s): collector "
            f"{replayed['cpu_us_per_report']:.0f} us/report under the load generator, "
            f"{simulated['cpu_us_per_report']:.0f} us/report under real simulated agents"
        )

    def _grpc_floor(self) -> dict[str, float]:
        """The same saturating load against a server that only parses and acknowledges (bench.transport)."""
        port = free_port()
        server = self.children.start(
            f"transport-{self.gpus}", python("bench.transport", "--serve", str(port))
        )
        load = None
        try:
            load = LoadGenerators(
                self.children,
                f"127.0.0.1:{port}",
                self.nodes,
                0.25,
                self.settings.seed,
                "--method",
                "/bench.Transport/Stream",
            )
            wait_for("connections to the plain server", lambda: load.status("connected") >= self.nodes, 60)
            time.sleep(3)
            acked, cpu, started = load.status("acked"), cpu_seconds(server.pid), time.monotonic()
            time.sleep(self.settings.window_s)
            elapsed = time.monotonic() - started
            acked, cpu = load.status("acked") - acked, cpu_seconds(server.pid) - cpu
        finally:
            if load is not None:
                with contextlib.suppress(Failure):
                    load.command("quit")
            self.children.stop(server)
        floor = {
            "reports_per_s": acked / elapsed,
            "cores": cpu / elapsed,
            "cpu_us_per_report": cpu / max(acked, 1) * 1e6,
        }
        self.say(
            f"gRPC alone (parse and acknowledge, same load): {floor['reports_per_s']:.0f} reports/s, "
            f"{floor['cpu_us_per_report']:.0f} us CPU/report"
        )
        return floor

    def _scrapes(self, collector: Collector, load: LoadGenerators, path: str, key: str) -> None:
        """Each scrape after a round (every node changed since the one before), then back to back."""
        out: dict[str, Any] = {}
        for gzip in (False, True):
            encoding = "gzip" if gzip else "plain"
            changed = []
            for _ in range(self.settings.scrapes):
                self._round(collector, load, settle_s=1.5)
                changed.append(collector.scrape(path, gzip))
            repeated = [collector.scrape(path, gzip) for _ in range(self.settings.scrapes)]
            out[encoding] = _scrape_stats(changed, self.background_cores)
            out[f"{encoding}_repeated"] = _scrape_stats(repeated, self.background_cores)
            self.say(
                f"GET {path} ({encoding}): median {out[encoding]['p50_s'] * 1e3:.0f} ms after every node "
                f"changed, {out[f'{encoding}_repeated']['p50_s'] * 1e3:.0f} ms repeated, "
                f"{out[encoding]['bytes'] / MIB:.1f} MiB"
            )
        self.result[key] = out

    def _shards(self, collector: Collector, load: LoadGenerators) -> None:
        shards = self.settings.shards_at_100k
        out: dict[str, Any] = {"shards": shards}
        rounds = 1 if self.settings.quick else 2
        for gzip in (False, True):
            encoding = "gzip" if gzip else "plain"
            runs = []
            for _ in range(rounds):
                # A round is 12,500 reports at once, ten times the steady rate: let the collector
                # take in its tail (acknowledgements, rendering) before scraping.
                self._round(collector, load, settle_s=max(1.5, self.nodes / 4000))
                runs += [
                    collector.scrape(f"/metrics/nodes?shard={s}&shards={shards}", gzip) for s in range(shards)
                ]
            out[encoding] = _scrape_stats(runs, self.background_cores)
            out[encoding]["max_bytes"] = max(r[2] for r in runs)
            self.say(
                f"{shards} shards ({encoding}): median {out[encoding]['p50_s'] * 1e3:.0f} ms, "
                f"max {out[encoding]['max_s'] * 1e3:.0f} ms, "
                f"largest {out[encoding]['max_bytes'] / MIB:.1f} MiB"
            )
        self.result["shards"] = out
        # The size of the whole exposition, for the record (HEAD: nothing is sent).
        self.result["metrics_whole_bytes"] = collector.head_length("/metrics")

    def _fleet_view(self, collector: Collector) -> None:
        runs = [collector.scrape("/metrics/fleet", gzip=False) for _ in range(self.settings.scrapes * 2)]
        self.result["fleet_view"] = _scrape_stats(runs, self.background_cores)

    def _freshness(self, collector: Collector) -> None:
        shards = max(1, min(1024, self.nodes // 12))
        probe = Probe(collector, self.settings.seed, self.nodes, shards)
        try:
            runs = []
            for mark in range(1, self.settings.probes + 1):
                runs.append(probe.measure(1_000_000 + mark))
                time.sleep(0.1)
        finally:
            probe.close()
        self.result["freshness"] = {
            name: {"p50_s": median([r[i] for r in runs]), "p99_s": percentile([r[i] for r in runs], 0.99)}
            for i, name in enumerate(("acked", "metrics", "query"))
        }
        fresh = self.result["freshness"]
        self.say(
            f"freshness ({len(runs)} probes): /metrics p99 {fresh['metrics']['p99_s'] * 1e3:.0f} ms, "
            f"query API p99 {fresh['query']['p99_s'] * 1e3:.0f} ms"
        )

    def _queries(self, collector: Collector) -> None:
        summary = []
        for _ in range(self.settings.scrapes * 2):
            started = time.perf_counter()
            collector.query.GetFleetSummary(query_pb2.GetFleetSummaryRequest(), timeout=30)
            summary.append(time.perf_counter() - started)
        pages, gpus, errors, token = [], 0, 0, ""
        started_all = time.perf_counter()
        while True:
            started = time.perf_counter()
            try:
                page = collector.query.ListGpus(
                    query_pb2.ListGpusRequest(page_size=1000, page_token=token), timeout=10
                )
            except grpc.RpcError:
                errors += 1
                if errors > 3:
                    break
                continue
            pages.append(time.perf_counter() - started)
            gpus += len(page.gpus)
            token = page.next_page_token
            if not token:
                break
        paging_s = time.perf_counter() - started_all
        cli = []
        for _ in range(3):
            started = time.perf_counter()
            answer = subprocess.run(
                python("gpufleet.cli", "summary", "--collector", collector.target),
                capture_output=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            cli.append(time.perf_counter() - started)
            if answer.returncode:
                raise Failure(f"gpufleet summary failed: {answer.stderr.decode()[-300:]}")
        self.result["query"] = {
            "summary_p50_s": median(summary),
            "summary_p99_s": percentile(summary, 0.99),
            "pages": len(pages),
            "page_p50_s": median(pages),
            "page_max_s": max(pages) if pages else float("nan"),
            "paging_s": paging_s,
            "gpus_paged": gpus,
            "page_errors": errors,
            "cli_summary_s": median(cli),
        }
        q = self.result["query"]
        self.say(
            f"query API: summary p50 {q['summary_p50_s'] * 1e3:.0f} ms; {q['gpus_paged']:,} GPUs in "
            f"{q['pages']} pages, {q['paging_s']:.1f} s, {q['page_errors']} errors; "
            f"CLI summary {q['cli_summary_s']:.2f} s"
        )

    def _baselines(self) -> None:
        self.say("baseline: prometheus_client (labelled metrics, generate_latest)")
        self.result["prometheus_client"] = run_json(
            self.children,
            f"baseline-client-{self.gpus}",
            python(
                "bench.baselines",
                "client",
                "--nodes",
                str(self.nodes),
                "--repeats",
                str(self.settings.scrapes),
            ),
        )
        self.say("baseline: Pushgateway")
        self.result["pushgateway"] = run_json(
            self.children,
            f"baseline-pushgateway-{self.gpus}",
            python(
                "bench.baselines",
                "pushgateway",
                "--nodes",
                str(self.nodes),
                "--repeats",
                str(self.settings.scrapes),
                "--check-seconds",
                "10" if self.settings.quick else "20",
            ),
        )


def _scrape_stats(runs: list[tuple[float, float, int]], background_cores: float) -> dict[str, float]:
    """Latency percentiles; CPU per scrape less what the steady ingest used meanwhile."""
    seconds = [r[0] for r in runs]
    cpu = sum(r[1] - background_cores * r[0] for r in runs) / len(runs)
    return {
        "scrapes": len(runs),
        "p50_s": median(seconds),
        "p99_s": percentile(seconds, 0.99),
        "max_s": max(seconds),
        "cpu_s": max(cpu, 0.0),
        "bytes": runs[-1][2],
    }


def run_json(children: Children, name: str, args: list[str]) -> dict[str, Any]:
    process = children.start(name, args, stdout=True)
    try:
        assert process.stdout is not None
        out = process.stdout.read()
        process.wait()
    finally:
        children.stop(process)
    if process.returncode:
        raise Failure(f"{name} failed; see {children.workdir / (name + '.log')}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# -- the agent as a guest -----------------------------------------------------------------------


class GuestAgent:
    """A real agent (simulated GPUs, default interval) beside a collector of its own, all run long."""

    WARMUP_S = 15.0

    def __init__(self, children: Children) -> None:
        self.collector = Collector(children, "guest-collector")
        self.process = children.start(
            "guest-agent", python("agent.main", "--source", "sim", "--collector", self.collector.target)
        )
        self.started = time.monotonic()
        self._cpu: float | None = None
        self._baseline_at = 0.0
        self.peak_rss = 0

    def sample(self) -> None:
        """Take the CPU baseline once warmed up; track the peak RSS."""
        if self.process.poll() is not None:
            raise Failure("the guest agent exited; see guest-agent.log")
        elapsed = time.monotonic() - self.started
        if self._cpu is None and elapsed >= self.WARMUP_S:
            self._cpu, self._baseline_at = cpu_seconds(self.process.pid), time.monotonic()
        self.peak_rss = max(self.peak_rss, memory_bytes(self.process.pid)["rss"])

    def result(self, minimum_s: float) -> dict[str, float]:
        while self._cpu is None or time.monotonic() - self._baseline_at < minimum_s:
            self.sample()
            time.sleep(1)
        self.sample()
        assert self._cpu is not None
        seconds = time.monotonic() - self._baseline_at
        reports = self.collector.metric(REPORTS_METRIC)
        return {
            "seconds": seconds,
            "core_percent": (cpu_seconds(self.process.pid) - self._cpu) / seconds * 100,
            "rss_bytes": memory_bytes(self.process.pid)["hwm"],
            "reports": reports,
        }


# -- the whole run ------------------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    started: float = field(default_factory=time.time)
    environment: dict[str, str] = field(default_factory=dict)
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    guest: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def environment() -> dict[str, str]:
    import prometheus_client
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError):
        memory = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024**2:.0f} GiB"
    pushgateway = shutil.which("prometheus-pushgateway") or ""
    pushgateway_version = "not installed"
    if pushgateway:
        answer = subprocess.run([pushgateway, "--version"], capture_output=True, text=True)
        pushgateway_version = (answer.stdout or answer.stderr).split("\n")[0].strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "protobuf_backend": api_implementation.Type(),
        "prometheus_client": getattr(prometheus_client, "__version__", _dist_version("prometheus_client")),
        "pushgateway": pushgateway_version,
    }


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def run(settings: Settings) -> Report:
    report = Report(settings, environment=environment())
    report.environment["load_average_before"] = load_average()
    if report.environment["protobuf_backend"] != "upb":
        raise Failure(
            f"protobuf runs on its {report.environment['protobuf_backend']!r} backend, not upb: the "
            "numbers would not be this project's (unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION)"
        )
    if report.environment["pushgateway"] == "not installed":
        report.notes.append(
            "The Pushgateway is not installed (Debian package prometheus-pushgateway): "
            "its baseline was skipped."
        )
        print("note: prometheus-pushgateway not found; its baseline is skipped", flush=True)
    raise_open_files_limit(max(settings.sizes) // fleet.GPUS_PER_NODE * 2)
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    children = Children(workdir)
    print(f"logs and databases in {workdir}", flush=True)
    try:
        guest = GuestAgent(children)
        children.keep(guest.process, guest.collector.process)
        for gpus in settings.sizes:
            scenario = Scenario(settings, children, gpus)
            report.scenarios.append(scenario.run())
            report.scenarios[-1]["load_average_after"] = load_average()
            guest.sample()
        report.guest = guest.result(minimum_s=30.0 if settings.quick else 60.0)
        print(
            f"agent (8 simulated GPUs, 10 s interval): {report.guest['core_percent']:.2f} % of a core, "
            f"{report.guest['rss_bytes'] / MIB:.0f} MB RSS over {report.guest['seconds']:.0f} s",
            flush=True,
        )
        guest.collector.close()
    finally:
        children.stop_everything()
    shutil.rmtree(workdir, ignore_errors=True)
    return report


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every child process is stopped."""

    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
