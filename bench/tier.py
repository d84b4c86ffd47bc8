"""`python -m bench.tier`: the collector tier, measured (a real PostgreSQL, real processes).

1. **The shared store's cost**: collector CPU per report with PostgreSQL and with SQLite, the
   same 10,000-GPU load (bench/load.py), one after the other in the same run.
2. **Failover**: two collectors, 1,250 simulated nodes (`gpufleet-agent --source sim`, default
   10 s interval and 10 s lease); kill -9 the one serving more; for each of its nodes, the time
   until the other exports it.
3. **Workers**: one host, `--workers 1` then `--workers 2`, the same load beyond one core;
   reports acknowledged per second.

Prints a table and a JSON line; `docs/benchmarks.md` ("A tier of collectors") holds the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench.procstat import cpu_seconds, percentile
from gpufleet.ports import free_port
from gpufleet.signals import terminate
from tests.conftest import http_get, wait_until
from tests.postgres_server import PostgresServer, postgres

ROOT = Path(__file__).resolve().parent.parent
NODES = 1250
GPU_INFO = re.compile(rb'^gpufleet_gpu_info\{node="([^"]*)",gpu="0"', re.M)
# Targets (docs/benchmarks.md).
STORE_TARGET_US = 50.0
FAILOVER_TARGET_INTERVALS = 2.0


def _python(*args: str, log: Path, stdin: bool = False, stdout: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout else log.open("ab"),
        stderr=log.open("ab"),
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    terminate(process, timeout_s=30)


@contextmanager
def collector(
    workdir: Path, db: str, *extra: str, http_port: int = 0
) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    grpc_port, http_port = free_port(), http_port or free_port()
    process = _python(
        "gpufleet.collector.main",
        "--db",
        db,
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        *extra,
        log=workdir / f"collector-{grpc_port}.log",
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(
            lambda: http_get(f"{base}/readyz", timeout=1)[0] == 200, timeout=60, what="collector ready"
        )
        yield process, f"127.0.0.1:{grpc_port}", base
    finally:
        _stop(process)


class Load:
    """bench/load.py against one target, its status lines read as they come."""

    def __init__(self, workdir: Path, target: str, nodes: int, interval_s: float) -> None:
        self.process = _python(
            "bench.load",
            "--collector",
            target,
            "--nodes",
            str(nodes),
            "--interval",
            str(interval_s),
            log=workdir / "load.log",
            stdin=True,
            stdout=True,
        )
        self.status: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.status = json.loads(line)
            except ValueError:
                continue

    def acked(self) -> int:
        return int(self.status.get("acked", 0))

    def stop(self) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"quit\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        _stop(self.process)


def _postgres_cpu(server: PostgresServer) -> float:
    """CPU seconds of the PostgreSQL server and its backends so far."""
    assert server.process is not None
    pids = [server.process.pid]
    with contextlib.suppress(OSError):
        pids += [
            int(p)
            for p in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
            .read_text()
            .split()
        ]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _connected(load: Load, nodes: int) -> None:
    wait_until(lambda: load.status.get("connected") == nodes, timeout=180, what="the load connected")


def _pids(process: subprocess.Popen[bytes]) -> list[int]:
    """The process and its children (workers)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    try:
        return [process.pid, *(int(pid) for pid in children.read_text().split())]
    except OSError:
        return [process.pid]


def _window(process: subprocess.Popen[bytes], load: Load, seconds: float) -> dict[str, float]:
    pids = _pids(process)
    cpu, acked, started = sum(cpu_seconds(p) for p in pids), load.acked(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    reports = load.acked() - acked
    used = sum(cpu_seconds(p) for p in pids) - cpu
    return {
        "reports_per_s": reports / elapsed,
        "cpu_cores": used / elapsed,
        "cpu_us_per_report": used / max(reports, 1) * 1e6,
    }


def _wal_bytes(server: PostgresServer) -> int:
    with psycopg.connect(server.admin_dsn) as db:
        row = db.execute("SELECT wal_bytes FROM pg_stat_wal").fetchone()
    return int(row[0]) if row else 0


def store_cost(workdir: Path, server: PostgresServer, window_s: float, nodes: int) -> dict[str, Any]:
    """Collector CPU per report, SQLite then PostgreSQL, 10,000 GPUs at a 2 s interval; and the
    PostgreSQL server's CPU and write-ahead log per report."""
    result: dict[str, Any] = {}
    for name, db in (("sqlite", str(workdir / "bench.db")), ("postgresql", server.database("store_cost"))):
        with collector(workdir, db) as (process, target, _):
            load = Load(workdir, target, nodes, 2.0)
            try:
                _connected(load, nodes)
                time.sleep(window_s / 5)
                wal, postgres_cpu = _wal_bytes(server), _postgres_cpu(server)
                result[name] = _window(process, load, window_s)
                if name == "postgresql":
                    reports = result[name]["reports_per_s"] * window_s
                    result[name]["wal_bytes_per_report"] = (_wal_bytes(server) - wal) / max(reports, 1)
                    used = _postgres_cpu(server) - postgres_cpu
                    result[name]["postgres_cpu_us_per_report"] = used / max(reports, 1) * 1e6
            finally:
                load.stop()
    result["added_us_per_report"] = (
        result["postgresql"]["cpu_us_per_report"] - result["sqlite"]["cpu_us_per_report"]
    )
    result["met"] = result["added_us_per_report"] <= STORE_TARGET_US
    return result


def _served(base: str) -> set[bytes]:
    return set(GPU_INFO.findall(http_get(f"{base}/metrics/nodes", timeout=10)[1]))


def failover(
    workdir: Path, server: PostgresServer, interval_s: float, nodes: int, lease_s: float
) -> dict[str, Any]:
    """Per-node time from kill -9 of a collector until the other exports the node."""
    db = server.database("failover")
    with (
        collector(workdir, db, "--collector-id", "a") as (a, target_a, base_a),
        collector(workdir, db, "--collector-id", "b") as (b, target_b, base_b),
    ):
        agents = _python(
            "gpufleet.agent.main",
            "--source",
            "sim",
            "--nodes",
            str(nodes),
            "--interval",
            str(interval_s),
            "--collector",
            f"{target_a},{target_b}",
            log=workdir / "agents.log",
        )
        try:
            wait_until(
                lambda: len(_served(base_a) | _served(base_b)) == nodes, timeout=180, what="every node served"
            )
            served_a, served_b = _served(base_a), _served(base_b)
            victim, moving, survivor = (
                (a, served_a, base_b) if len(served_a) >= len(served_b) else (b, served_b, base_a)
            )
            killed = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            arrived: dict[bytes, float] = {}
            while len(arrived) < len(moving) and time.monotonic() - killed < 20 * interval_s:
                now = time.monotonic() - killed
                for node in _served(survivor) & moving:
                    arrived.setdefault(node, now)
                time.sleep(0.25)
        finally:
            _stop(agents)
    times = sorted(arrived.values())
    result = {
        "nodes_moved": len(moving),
        "nodes_arrived": len(arrived),
        "p50_s": percentile(times, 0.5) if times else None,
        "p99_s": percentile(times, 0.99) if times else None,
        "max_s": times[-1] if times else None,
        "interval_s": interval_s,
    }
    result["met"] = (
        bool(times) and len(arrived) == len(moving) and times[-1] <= FAILOVER_TARGET_INTERVALS * interval_s
    )
    return result


def workers(
    workdir: Path, server: PostgresServer, window_s: float, nodes: int, interval_s: float
) -> dict[str, Any]:
    """Reports acknowledged per second by one host with 1 and 2 workers, the same offered load."""
    result: dict[str, Any] = {"offered_reports_per_s": nodes / interval_s}
    for count in (1, 2):
        db = server.database(f"workers_{count}")
        with collector(workdir, db, "--workers", str(count), http_port=free_port()) as (process, target, _):
            load = Load(workdir, target, nodes, interval_s)
            try:
                _connected(load, nodes)
                time.sleep(window_s / 4)
                result[f"workers_{count}"] = _window(process, load, window_s)
            finally:
                load.stop()
    result["ratio"] = result["workers_2"]["reports_per_s"] / max(result["workers_1"]["reports_per_s"], 1e-9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds each CPU measurement lasts")
    parser.add_argument(
        "--interval", type=float, default=10.0, help="the agents' report interval for failover"
    )
    parser.add_argument("--nodes", type=int, default=NODES, help="nodes of 8 GPUs (default 1,250)")
    parser.add_argument(
        "--lease", type=float, default=10.0, help="the collectors' --lease-seconds for failover"
    )
    parser.add_argument("--skip", action="append", default=[], choices=("store", "failover", "workers"))
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-tier-") as scratch:
        workdir = Path(scratch)
        with postgres(workdir) as server:
            if "store" not in args.skip:
                print("store: collector CPU per report, SQLite and PostgreSQL ...", flush=True)
                report["store"] = store_cost(workdir, server, args.window, args.nodes)
                _print({"store": report["store"]})
            if "failover" not in args.skip:
                print(f"failover: kill -9 one of two collectors serving {args.nodes:,} nodes ...", flush=True)
                report["failover"] = failover(workdir, server, args.interval, args.nodes, args.lease)
                _print({"failover": report["failover"]})
            if "workers" not in args.skip:
                print("workers: one host, 1 and 2 workers, the same load ...", flush=True)
                report["workers"] = workers(workdir, server, args.window, args.nodes, 0.5)
                _print({"workers": report["workers"]})
    print(json.dumps(report), flush=True)


def _print(report: dict[str, Any]) -> None:
    if store := report.get("store"):
        for name in ("sqlite", "postgresql"):
            row = store[name]
            print(
                f"{name:<12} {row['cpu_us_per_report']:7.0f} us CPU per report "
                f"({row['reports_per_s']:.0f} reports/s, {row['cpu_cores']:.2f} cores)"
            )
        row = store["postgresql"]
        print(
            f"PostgreSQL server: {row['postgres_cpu_us_per_report']:.0f} us CPU and "
            f"{row['wal_bytes_per_report']:.0f} bytes of WAL per report"
        )
        print(
            f"PostgreSQL adds {store['added_us_per_report']:.0f} us per report "
            f"(target <= {STORE_TARGET_US:.0f}): {'met' if store['met'] else 'NOT met'}"
        )
    if moved := report.get("failover"):
        print(
            f"failover of {moved['nodes_moved']} nodes: {moved['nodes_arrived']} served again; "
            f"p50 {moved['p50_s']:.1f} s, p99 {moved['p99_s']:.1f} s, max {moved['max_s']:.1f} s "
            f"(interval {moved['interval_s']:.0f} s; target <= {FAILOVER_TARGET_INTERVALS:.0f} intervals): "
            f"{'met' if moved['met'] else 'NOT met'}"
        )
    if load := report.get("workers"):
        for count in (1, 2):
            row = load[f"workers_{count}"]
            print(
                f"{count} worker(s): {row['reports_per_s']:.0f} reports/s acknowledged, "
                f"{row['cpu_cores']:.2f} cores (offered {load['offered_reports_per_s']:.0f}/s)"
            )
        print(f"2 workers / 1 worker: {load['ratio']:.2f}x")


if __name__ == "__main__":
    main()
