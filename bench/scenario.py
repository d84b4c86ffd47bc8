"""One fleet size: a collector under load, measured (ingest, scrapes, freshness, queries, a guest agent)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any

import grpc

from bench import fleet
from bench.processes import (
    MIB,
    REPORTS_METRIC,
    ROOT,
    STREAMS_METRIC,
    Children,
    Collector,
    Failure,
    LoadGenerators,
    Probe,
    Settings,
    python,
    wait_for,
)
from bench.procstat import cpu_seconds, median, memory_bytes, percentile
from gpufleet.ports import free_port
from gpufleet.v1 import query_pb2

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
                "gpufleet.agent.main",
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
            "guest-agent",
            python("gpufleet.agent.main", "--source", "sim", "--collector", self.collector.target),
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
