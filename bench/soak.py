"""`python -m bench soak`: one real collector under a steady fleet for a long time, watched for leaks.

It starts `gpufleet-collector` (its SQLite database in a temporary directory) and
the load generator (bench/load.py: one gRPC stream per node, every node reporting
every 10 s), then, while scraping /metrics/fleet and one /metrics/nodes shard every
0.5 s as Prometheus would, samples the collector every --sample-seconds: RSS and
open file descriptors (/proc), CPU used in the period, the worst scrape latency
(what a pause of the event loop, the garbage collector's included, looks like from
outside) and, when the collector exposes them, its own `python_gc_*` series.
After the warm-up, least-squares slopes of RSS and descriptors over time show
leaks. The exit status is 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fleet, harness, load, processes
from bench.procstat import load_average, median, memory_bytes, open_fds, percentile

MIB = 1024 * 1024
REPORT_INTERVAL_S = 10.0
# The goals (docs/benchmarks.md): judged on the samples after the warm-up.
RSS_GROWTH_GOAL_PERCENT_PER_HOUR = 1.0
FD_DRIFT_GOAL = 1.0  # descriptors gained or lost over the whole fitted window
PAUSE_GOAL_S = 0.100
PAUSE_GOAL_GPUS = 10_000
MIN_FIT_SAMPLES = 3
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class SoakSettings:
    gpus: int = 10_000
    minutes: float = 30.0
    warmup_minutes: float | None = None  # None: min(5, minutes / 3)
    sample_seconds: float = 60.0
    scrape_every_s: float = 0.5
    shards: int = 32
    seed: int = 0

    @property
    def nodes(self) -> int:
        return self.gpus // fleet.GPUS_PER_NODE

    @property
    def warmup_s(self) -> float:
        minutes = self.warmup_minutes if self.warmup_minutes is not None else min(5.0, self.minutes / 3)
        return minutes * 60


@dataclass
class Sample:
    """The collector at the end of one period, and what the scrapes saw during it."""

    t_s: float  # seconds since the whole fleet was connected
    period_s: float
    rss_bytes: int
    fds: int
    cores: float  # collector CPU seconds per second in the period
    reports_per_s: float
    streams: int
    db_bytes: int
    scrapes: int
    failed_scrapes: int
    fleet_max_s: float
    shard_p50_s: float
    shard_max_s: float
    load_average: str
    gc_collections: dict[str, float] = field(default_factory=dict)  # by generation, in the period
    gc_pause_s: float | None = None  # GC pause time in the period, when the collector counts it
    gc_pause_max_s: float | None = None  # upper bound of the period's longest GC pause (histogram)

    @property
    def worst_scrape_s(self) -> float:
        return max(self.fleet_max_s, self.shard_max_s)


@dataclass
class SoakResult:
    settings: SoakSettings
    started: float = field(default_factory=time.time)
    environment: dict[str, str] = field(default_factory=dict)
    connect_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    # (seconds since the fleet connected, latency in seconds) of every scrape.
    fleet_scrapes: list[tuple[float, float]] = field(default_factory=list)
    shard_scrapes: list[tuple[float, float]] = field(default_factory=list)
    gc_series: list[str] = field(default_factory=list)  # the collector's GC series, if any
    interrupted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


# -- reading the collector ------------------------------------------------------------------


def parse_series(body: bytes) -> dict[str, float]:
    """Every sample of a text exposition, as 'name{labels}' -> value."""
    series = {}
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            series[key] = float(value)
    return series


def _name(key: str) -> str:
    return key.split("{", 1)[0]


def _labels(key: str) -> dict[str, str]:
    return dict(_LABEL.findall(key.partition("{")[2]))


def _total(series: dict[str, float], name: str) -> float:
    return sum(value for key, value in series.items() if _name(key) == name)


def _is_gc(name: str) -> bool:
    return name.startswith("python_gc_") or "_gc_" in name


@dataclass(frozen=True)
class GcPeriod:
    collections: dict[str, float]
    pause_s: float | None
    pause_max_s: float | None


def gc_period(before: dict[str, float], after: dict[str, float]) -> GcPeriod:
    """What the collector's GC series say about the period between two scrapes.

    Collections come from `python_gc_collections_total` (prometheus_client's GC
    collector), by generation; pauses from any GC family in seconds (a histogram
    or a summary): their total and, for a histogram, the bucket that holds the
    longest.
    """
    delta = {key: value - before.get(key, 0.0) for key, value in after.items() if _is_gc(_name(key))}
    collections: dict[str, float] = {}
    pause_s: float | None = None
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for key, value in delta.items():
        name, labels = _name(key), _labels(key)
        if name.endswith("collections_total"):
            generation = labels.get("generation", "all")
            collections[generation] = collections.get(generation, 0.0) + value
        elif name.endswith("_seconds_sum"):
            pause_s = (pause_s or 0.0) + value
        elif name.endswith("_seconds_bucket") and "le" in labels:
            bound = float(labels.pop("le"))
            group = (name, json.dumps(labels, sort_keys=True))
            buckets.setdefault(group, []).append((bound, value))
    return GcPeriod(collections, pause_s, _longest(buckets) if buckets else None)


def _longest(buckets: dict[tuple[str, str], list[tuple[float, float]]]) -> float:
    """The upper bound of the bucket that holds the longest observation, over every group."""
    longest = 0.0
    for counts in buckets.values():
        counts.sort()
        observed = counts[-1][1]  # the +Inf bucket: every observation
        if observed <= 0:
            continue
        longest = max(longest, next(bound for bound, count in counts if count >= observed))
    return longest


@dataclass(frozen=True)
class Fit:
    slope: float  # per second
    start: float  # the fitted value at the first point's time
    stderr: float  # standard error of the slope: how much of it noise alone could make


def fit_line(points: list[tuple[float, float]]) -> Fit:
    """Least-squares line through (seconds, value) points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    slope, intercept = statistics.linear_regression(xs, ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    mean_x = statistics.fmean(xs)
    spread = sum((x - mean_x) ** 2 for x in xs)
    stderr = math.sqrt(residual / (len(xs) - 2) / spread) if len(xs) > 2 and spread else math.inf
    return Fit(slope, intercept + slope * xs[0], stderr)


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    cpu_s: float  # the collector's CPU seconds so far
    series: dict[str, float]  # its /metrics/fleet


class Soak:
    def __init__(self, settings: SoakSettings, children: processes.Children) -> None:
        self.settings = settings
        self.children = children
        self.result = SoakResult(settings)
        self._shard = 0
        self._t0 = 0.0
        self._fleet_latencies: list[float] = []
        self._shard_latencies: list[float] = []
        self._failed = 0
        self._name = f"soak-collector-{settings.gpus}"
        self._db = children.workdir / f"{self._name}.db"
        self._series: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(message, flush=True)

    def run(self) -> SoakResult:
        collector = processes.Collector(self.children, self._name)
        generators = None
        try:
            generators = self._connect(collector)
            self._sample(collector)
        finally:
            if generators is not None:
                with contextlib.suppress(processes.Failure, OSError):
                    generators.command("quit")
            collector.close()
            self.children.stop_all()
        return self.result

    def _connect(self, collector: processes.Collector) -> processes.LoadGenerators:
        nodes = self.settings.nodes
        self.say(f"connecting {nodes:,} nodes ({self.settings.gpus:,} GPUs), one gRPC stream each")
        started = time.monotonic()
        generators = processes.LoadGenerators(
            self.children, collector.target, nodes, REPORT_INTERVAL_S, self.settings.seed
        )
        processes.wait_for(
            f"{nodes} agent streams",
            lambda: collector.metric(processes.STREAMS_METRIC) >= nodes,
            timeout=60 + nodes / 100,
            interval=0.5,
        )
        self.result.connect_s = time.monotonic() - started
        self.say(f"connected in {self.result.connect_s:.1f} s; every node reports every 10 s")
        return generators

    def _sample(self, collector: processes.Collector) -> None:
        settings = self.settings
        self._t0 = time.monotonic()
        end = self._t0 + settings.minutes * 60
        previous = self._snapshot(collector)
        period_end = self._t0
        try:
            while period_end < end - 1e-6:
                period_end = min(period_end + settings.sample_seconds, end)
                self._scrape_until(collector, period_end)
                current = self._snapshot(collector)
                sample = self._close_period(collector, previous, current)
                self.result.samples.append(sample)
                self.say(self._progress(sample))
                previous = current
        except KeyboardInterrupt:
            self.result.interrupted = True
            self.say("interrupted: stopping the collector and the load generators")

    def _scrape_until(self, collector: processes.Collector, until: float) -> None:
        """Scrape the fleet view and the next shard every scrape_every_s, until ``until``."""
        tick = time.monotonic()
        while (now := time.monotonic()) < until:
            if now >= tick:
                self._scrape_fleet(collector)
                path = f"/metrics/nodes?shard={self._shard}&shards={self.settings.shards}"
                self._shard = (self._shard + 1) % self.settings.shards
                self._timed_get(collector, path, self._shard_latencies, self.result.shard_scrapes)
                tick += self.settings.scrape_every_s
                if tick < time.monotonic():  # fell behind (a long pause): no burst to catch up
                    tick = time.monotonic() + self.settings.scrape_every_s
            time.sleep(max(0.0, min(tick, until) - time.monotonic()))

    def _scrape_fleet(self, collector: processes.Collector) -> bytes:
        return self._timed_get(collector, "/metrics/fleet", self._fleet_latencies, self.result.fleet_scrapes)

    def _timed_get(
        self,
        collector: processes.Collector,
        path: str,
        period: list[float],
        everything: list[tuple[float, float]],
    ) -> bytes:
        started = time.perf_counter()
        try:
            status, body, _ = collector.get(path)
        except (OSError, http.client.HTTPException):
            status, body = 0, b""
        elapsed = time.perf_counter() - started
        if status != 200:  # counted; a collector that exited fails the next sample
            self._failed += 1
            return b""
        period.append(elapsed)
        everything.append((time.monotonic() - self._t0, elapsed))
        return body

    def _snapshot(self, collector: processes.Collector) -> Snapshot:
        body = self._scrape_fleet(collector)
        if body:  # a failed scrape (counted) keeps the counters of the one before
            self._series = parse_series(body)
        return Snapshot(time.monotonic(), collector.cpu(), self._series)

    def _close_period(self, collector: processes.Collector, previous: Snapshot, current: Snapshot) -> Sample:
        pid = collector.pid
        seconds = current.at - previous.at
        before, after = previous.series, current.series
        reports = _total(after, processes.REPORTS_METRIC) - _total(before, processes.REPORTS_METRIC)
        gc = gc_period(before, after)
        if not self.result.gc_series:
            self.result.gc_series = sorted(key for key in after if _is_gc(_name(key)))
        sample = Sample(
            t_s=current.at - self._t0,
            period_s=seconds,
            rss_bytes=memory_bytes(pid)["rss"],
            fds=open_fds(pid),
            cores=(current.cpu_s - previous.cpu_s) / seconds,
            reports_per_s=reports / seconds,
            streams=int(_total(after, processes.STREAMS_METRIC)),
            db_bytes=self._db_bytes(),
            scrapes=len(self._fleet_latencies) + len(self._shard_latencies),
            failed_scrapes=self._failed,
            fleet_max_s=max(self._fleet_latencies, default=math.nan),
            shard_p50_s=median(self._shard_latencies),
            shard_max_s=max(self._shard_latencies, default=math.nan),
            load_average=load_average(),
            gc_collections=gc.collections,
            gc_pause_s=gc.pause_s,
            gc_pause_max_s=gc.pause_max_s,
        )
        self._fleet_latencies, self._shard_latencies, self._failed = [], [], 0
        return sample

    def _db_bytes(self) -> int:
        """The database with its write-ahead log."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += (self._db.parent / (self._db.name + suffix)).stat().st_size
        return total

    def _progress(self, sample: Sample) -> str:
        warmup = " (warm-up)" if sample.t_s < self.settings.warmup_s else ""
        gc = ""
        if sample.gc_collections:
            gc = f", {sample.gc_collections.get('2', 0):.0f} full GCs"
        return (
            f"[{_clock(sample.t_s):>5} of {_clock(self.settings.minutes * 60)}] "
            f"RSS {sample.rss_bytes / MIB:.1f} MiB, "
            f"{sample.fds} fds, CPU {sample.cores * 100:.1f} % of a core, "
            f"{sample.reports_per_s:.0f} reports/s, {sample.streams} streams, worst scrape "
            f"{sample.worst_scrape_s * 1e3:.0f} ms{gc}{warmup}"
        )


# -- the summary ----------------------------------------------------------------------------


def summarize(result: SoakResult) -> dict[str, Any]:
    settings = result.settings
    fitted = [s for s in result.samples if s.t_s >= settings.warmup_s - 1e-6]
    # A period counts for the pause goal when it started after the warm-up.
    measured = [s for s in fitted if s.t_s - s.period_s >= settings.warmup_s - 1.0]
    summary: dict[str, Any] = {
        "warmup_s": settings.warmup_s,
        "samples_fitted": len(fitted),
        "shard": _latencies(result.shard_scrapes),
        "fleet": _latencies(result.fleet_scrapes),
        "gc_exposed": bool(result.gc_series),
        "goals": [],
    }
    if len(fitted) < MIN_FIT_SAMPLES:
        summary["goals"] = [
            {"goal": goal, "measured": f"too few samples after the warm-up ({len(fitted)})", "result": "n/a"}
            for goal in ("RSS growth", "open file descriptors", "longest scrape pause")
        ]
        return summary
    window_s = fitted[-1].t_s - fitted[0].t_s
    rss = fit_line([(s.t_s, s.rss_bytes) for s in fitted])
    rss_slope, rss_start = rss.slope, rss.start
    fd = fit_line([(s.t_s, s.fds) for s in fitted])
    fd_slope, fd_start = fd.slope, fd.start
    rss_percent_per_hour = rss_slope * 3600 / rss_start * 100
    # Two standard errors: a slope within them of the goal could be noise (a short soak).
    rss_margin = 2 * rss.stderr * 3600 / rss_start * 100
    fds_per_hour = fd_slope * 3600
    worst = max(measured or fitted, key=lambda s: s.worst_scrape_s)
    summary.update(
        window_s=window_s,
        rss_start_bytes=rss_start,
        rss_bytes_per_hour=rss_slope * 3600,
        rss_percent_per_hour=rss_percent_per_hour,
        rss_margin_percent_per_hour=rss_margin,
        fds_start=fd_start,
        fds_per_hour=fds_per_hour,
        fds_drift=fd_slope * window_s,
        fds_range=(min(s.fds for s in fitted), max(s.fds for s in fitted)),
        longest_pause_s=worst.worst_scrape_s,
        longest_pause_at_s=worst.t_s,
        gc_pause_max_s=max((s.gc_pause_max_s for s in fitted if s.gc_pause_max_s is not None), default=None),
    )
    pause_goal = f"< {PAUSE_GOAL_S * 1e3:.0f} ms"
    if settings.gpus != PAUSE_GOAL_GPUS:
        pause_goal += f" (set for {PAUSE_GOAL_GPUS:,} GPUs)"
    summary["goals"] = [
        {
            "goal": "RSS growth",
            "measured": f"{rss_percent_per_hour:+.2f} ± {rss_margin:.2f} %/h "
            f"({rss_slope * 3600 / MIB:+.1f} MiB/h from {rss_start / MIB:.0f} MiB)",
            "target": f"< {RSS_GROWTH_GOAL_PERCENT_PER_HOUR:g} %/h",
            "result": _verdict(
                rss_percent_per_hour + rss_margin < RSS_GROWTH_GOAL_PERCENT_PER_HOUR,
                unsure=rss_percent_per_hour - rss_margin < RSS_GROWTH_GOAL_PERCENT_PER_HOUR,
            ),
        },
        {
            "goal": "open file descriptors",
            "measured": f"{fds_per_hour:+.1f}/h ({fd_slope * window_s:+.1f} over "
            f"{window_s / 60:.1f} min, {summary['fds_range'][0]}-{summary['fds_range'][1]})",
            "target": f"flat (drift < {FD_DRIFT_GOAL:g} over the fit)",
            "result": _verdict(abs(fd_slope * window_s) < FD_DRIFT_GOAL),
        },
        {
            "goal": "longest scrape pause",
            "measured": f"{worst.worst_scrape_s * 1e3:.0f} ms (period ending at {worst.t_s / 60:.1f} min)",
            "target": pause_goal,
            "result": _verdict(worst.worst_scrape_s < PAUSE_GOAL_S),
        },
    ]
    return summary


def _latencies(scrapes: list[tuple[float, float]]) -> dict[str, float]:
    seconds = [s for _, s in scrapes]
    return {
        "scrapes": len(seconds),
        "p50_s": median(seconds),
        "p99_s": percentile(seconds, 0.99),
        "max_s": max(seconds, default=math.nan),
    }


def _verdict(met: bool, unsure: bool = False) -> str:
    """PASS, FAIL, or UNSURE: the goal lies within the noise of the measurement (run longer)."""
    if met:
        return "PASS"
    return "UNSURE" if unsure else "FAIL"


def table(result: SoakResult) -> str:
    gc = bool(result.gc_series)
    header = (
        f"{'time':>6} {'RSS MiB':>8} {'fds':>5} {'CPU %':>6} {'reports/s':>9} {'streams':>7} "
        f"{'DB MiB':>6} {'scrapes':>7} {'failed':>6} {'fleet max':>9} {'shard p50':>9} {'shard max':>9}"
        + (f" {'full GCs':>8} {'GC pause':>8}" if gc else "")
        + f"  {'load average':<14}"
    )
    lines = [header]
    for s in result.samples:
        mark = "*" if s.t_s < result.settings.warmup_s - 1e-6 else " "
        row = (
            f"{_clock(s.t_s):>5}{mark} {s.rss_bytes / MIB:8.1f} {s.fds:5d} {s.cores * 100:6.1f} "
            f"{s.reports_per_s:9.0f} {s.streams:7d} {s.db_bytes / MIB:6.1f} {s.scrapes:7d} "
            f"{s.failed_scrapes:6d} {_ms(s.fleet_max_s):>9} {_ms(s.shard_p50_s):>9} {_ms(s.shard_max_s):>9}"
        )
        if gc:
            pause = "-" if s.gc_pause_s is None else _ms(s.gc_pause_s)
            row += f" {s.gc_collections.get('2', 0):8.0f} {pause:>8}"
        lines.append(row + f"  {s.load_average:<14}")
    lines.append("time: since the whole fleet connected; * warm-up, not in the fit")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    """Minutes and seconds: 2:30."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f} ms"


def text(result: SoakResult) -> str:
    settings, summary = result.settings, result.summary
    env = result.environment
    lines = [
        "",
        f"soak: {settings.gpus:,} GPUs ({settings.nodes:,} nodes, one report each every 10 s), "
        f"{result.samples[-1].t_s / 60 if result.samples else 0:.1f} of {settings.minutes:g} min"
        f"{' (interrupted)' if result.interrupted else ''}, warm-up {settings.warmup_s / 60:.1f} min, "
        f"a sample every {settings.sample_seconds:g} s",
        f"machine: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; load average "
        f"{env.get('load_average_before', '?')} before, {env.get('load_average_after', '?')} after",
        "",
        table(result),
        "",
    ]
    for name, path in (
        ("shard", f"/metrics/nodes?shard=I&shards={settings.shards}"),
        ("fleet", "/metrics/fleet"),
    ):
        stats = summary[name]
        lines.append(
            f"{path}: {stats['scrapes']} scrapes, p50 {_ms(stats['p50_s'])}, p99 {_ms(stats['p99_s'])}, "
            f"max {_ms(stats['max_s'])}"
        )
    if summary["gc_exposed"]:
        names = sorted({_name(key) for key in result.gc_series})
        lines.append(f"GC series from the collector: {', '.join(names)}")
        if summary.get("gc_pause_max_s") is not None:
            lines.append(f"longest GC pause it reports: <= {_ms(summary['gc_pause_max_s'])}")
    else:
        lines.append("the collector exposes no GC series: pauses are the worst scrape latency, from outside")
    lines += ["", "goals (after the warm-up; ± two standard errors of the fitted slope):"]
    for goal in summary["goals"]:
        lines.append(
            f"  [{goal['result']:>6}] {goal['goal']}: {goal['measured']}"
            + (f"; goal {goal['target']}" if "target" in goal else "")
        )
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=int, default=10_000, help="fleet size, 8 GPUs per node (default: 10000)"
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the soak runs (default: 30)")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        help="left out of the fit (default: min(5, minutes / 3))",
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=60.0, help="the sampling period (default: 60)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SoakSettings:
    if args.gpus < fleet.GPUS_PER_NODE:
        parser.error("--gpus needs at least 8 GPUs (one node)")
    if args.minutes <= 0 or args.sample_seconds <= 0:
        parser.error("--minutes and --sample-seconds must be positive")
    if args.sample_seconds < 2:
        parser.error("--sample-seconds must be at least 2 (scrapes run every 0.5 s)")
    if args.warmup_minutes is not None and not 0 <= args.warmup_minutes < args.minutes:
        parser.error("--warmup-minutes must be at least 0 and less than --minutes")
    return SoakSettings(
        gpus=args.gpus,
        minutes=args.minutes,
        warmup_minutes=args.warmup_minutes,
        sample_seconds=args.sample_seconds,
    )


def run(settings: SoakSettings) -> SoakResult:
    environment = harness.environment()
    if environment["protobuf_backend"] != "upb":
        raise processes.Failure(f"protobuf runs on its {environment['protobuf_backend']!r} backend, not upb")
    environment["load_average_before"] = load_average()
    load.raise_open_files_limit(settings.nodes)  # the collector inherits it
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-soak-"))
    children = processes.Children(workdir)
    print(f"logs and database in {workdir}", flush=True)
    try:
        soak = Soak(settings, children)
        soak.result.environment = environment
        result = soak.run()
    finally:
        children.stop_everything()
    environment["load_average_after"] = load_average()
    shutil.rmtree(workdir, ignore_errors=True)
    result.summary = summarize(result)
    return result


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    settings = settings_from(args, parser)
    try:
        with harness.terminate_cleanly():
            result = run(settings)
    except processes.Failure as exc:
        sys.exit(f"soak failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted; every process it started was stopped")
    print(text(result))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    if any(goal["result"] == "FAIL" for goal in result.summary["goals"]):
        sys.exit(1)
