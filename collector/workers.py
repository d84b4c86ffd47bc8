"""`--workers N`: N collector processes on one host, N members of one tier, so ingest uses N cores.

Python runs one core per process; a tier spreads nodes over processes as over hosts. The parent
starts N workers with the same settings and these differences: worker I is named
`<collector id>-I` and serves HTTP on the given port + I (Prometheus scrapes each); all of them
listen for gRPC on the same port (SO_REUSEPORT, which gRPC sets on Linux), so the kernel spreads
agents' connections over them and the tier's leases decide which worker serves which node. The
parent forwards SIGTERM and SIGINT, starts again a worker that dies (after RESTART_DELAY_S), and
exits with the first worker's status that refuses its settings (exit 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
POLL_S = 0.2
STOP_TIMEOUT_S = 30.0


def worker_command(argv: Sequence[str], index: int, collector_id: str, http: tuple[str, int]) -> list[str]:
    """The command line of worker ``index``: the parent's, one worker, its own name and HTTP port."""
    host, port = http
    return [
        sys.executable,
        "-m",
        "gpufleet.collector.main",
        *argv,
        "--workers",
        "1",
        "--collector-id",
        f"{collector_id}-{index}",
        "--http-listen",
        f"[{host}]:{port + index}" if ":" in host else f"{host}:{port + index}",
    ]


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the parent dies, even by kill -9 (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, preexec_fn=_die_with_parent)  # noqa: PLW1509 (only prctl)


def supervise(
    argv: Sequence[str], workers: int, collector_id: str, http: tuple[str, int], grpc_port: int
) -> int:
    """Run ``workers`` workers until a signal; return the exit status."""
    collector_id = collector_id or f"{socket.gethostname()}:{grpc_port}"
    commands = [worker_command(argv, i, collector_id, http) for i in range(workers)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes = [_start(command) for command in commands]
    log.info("started %d collector workers (%s-0 .. %s-%d)", workers, collector_id, collector_id, workers - 1)
    status = 0
    while not stopping:
        time.sleep(POLL_S)
        for index, process in enumerate(processes):
            code = process.poll()
            if code is None or stopping:
                continue
            if code == 2:  # it refused its settings: so would every other
                log.error("worker %d refused to start (exit 2): stopping the others", index)
                stopping, status = True, 2
                break
            log.error("worker %d exited with %d: starting it again in %.0f s", index, code, RESTART_DELAY_S)
            time.sleep(RESTART_DELAY_S)
            processes[index] = _start(commands[index])
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return status
