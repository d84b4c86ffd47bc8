"""`--workers N`: N collector processes on one host as N members of one tier."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from gpufleet.ports import free_port
from tests.conftest import ROOT, Processes, http_get, wait_until
from tests.postgres_server import PostgresServer

NODES = 40
GPU_INFO = re.compile(rb'^gpufleet_gpu_info\{node="([^"]*)",gpu="(\d+)"', re.M)


def test_two_workers_share_one_grpc_port_and_serve_every_gpu_once(
    processes: Processes, postgresql: PostgresServer
) -> None:
    grpc_port, http_port = free_port(), free_port()
    while http_port + 1 == grpc_port:
        http_port = free_port()
    parent = processes.start(
        "gpufleet.collector.main",
        "--db",
        postgresql.dsn,
        "--workers",
        "2",
        "--collector-id",
        "host",
        "--lease-seconds",
        "2",
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
    )
    bases = [f"http://127.0.0.1:{http_port + i}" for i in range(2)]
    for base in bases:
        wait_until(lambda base=base: http_get(f"{base}/readyz", timeout=1)[0] == 200, what="worker ready")
    processes.sim_fleet("--nodes", str(NODES), "--interval", "1", "--collector", f"127.0.0.1:{grpc_port}")

    def served() -> list[set[tuple[bytes, bytes]]]:
        return [set(GPU_INFO.findall(http_get(f"{base}/metrics/nodes")[1])) for base in bases]

    def every_gpu_once() -> bool:
        first, second = served()
        return len(first | second) == NODES * 8 and not first & second

    wait_until(every_gpu_once, timeout=60, what="every GPU served once by the two workers")
    assert all(served()), "the kernel gave one worker every connection"
    wait_until(
        lambda: (
            b'gpufleet_collector_tier_members{collector="host-1"} 2.0'
            in http_get(f"{bases[1]}/metrics/fleet")[1]
        ),
        what="worker 1 seeing worker 0",
    )
    # A worker that dies is started again; its nodes are served meanwhile by the other.
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
    second = next(
        int(pid)
        for pid in children
        if f"127.0.0.1:{http_port + 1}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: _refused(bases[1]), timeout=10, what="the worker gone")
    wait_until(
        lambda: http_get(f"{bases[1]}/readyz", timeout=1)[0] == 200, timeout=60, what="the worker back"
    )
    wait_until(every_gpu_once, timeout=60, what="every GPU served once again")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 0
    for base in bases:
        wait_until(lambda base=base: _refused(base), timeout=10, what="the workers gone")


def _refused(base: str) -> bool:
    try:
        http_get(f"{base}/healthz", timeout=1)
    except OSError:
        return True
    return False


def test_workers_without_postgresql_are_refused_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.collector.main", "--workers", "2", "--db", "none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers needs a PostgreSQL --db" in lines[0], result.stderr
