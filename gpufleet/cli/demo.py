"""`gpufleet demo`: a collector and a simulated fleet on localhost, until Ctrl-C.

Everything binds to 127.0.0.1; both children are stopped on exit, whatever
ends the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from gpufleet.cli.client import CollectorUnavailable, FleetClient
from gpufleet.cli.commands import cmd_summary
from gpufleet.ports import free_port
from gpufleet.signals import terminate

GPUS_PER_NODE = 8
REGISTRATION_TIMEOUT_S = 120.0
LOG_DIR = Path(".demo")
# What idle GPUs cost in the demo: a 2025-2026 on-demand H100 price per GPU-hour.
DEMO_PRICE = "H100=2.50"


@contextlib.contextmanager
def child(name: str, args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process, logging to .demo/NAME.log; SIGTERM it (then SIGKILL) on exit."""
    LOG_DIR.mkdir(exist_ok=True)
    with (LOG_DIR / f"{name}.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            terminate(process)


def _progress(message: str) -> None:
    end = "\r" if sys.stdout.isatty() else "\n"
    print(f"  {message}".ljust(70), end=end, flush=True)


# Faults 200 times as often as in the Llama 3 run: about 30 GPUs unhealthy or lost at the start
# (the scenario's last hour), 30 more an hour, and a few at risk (docs/health-score.md).
DEMO_FAULT_RATE_MULTIPLIER = 200


def wait_for_fleet(client: FleetClient, nodes: int, processes: list[subprocess.Popen[bytes]]) -> float:
    """Show progress until every node reports; return the seconds it took."""
    started = time.monotonic()
    last_shown = ""
    while time.monotonic() - started < REGISTRATION_TIMEOUT_S:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a child process exited with code {process.returncode}; see {LOG_DIR}/")
        try:
            summary = client.summary()
        except CollectorUnavailable:
            summary = None
        if summary is not None:
            up = next((c.count for c in summary.nodes_by_state if c.key == "up"), 0)
            message = f"{up:>5}/{nodes} nodes up, {summary.gpus:>6} GPUs registered"
            if message != last_shown:
                _progress(message)
                last_shown = message
            if up >= nodes and summary.gpus >= nodes * GPUS_PER_NODE:
                print()
                return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"the fleet did not register within {REGISTRATION_TIMEOUT_S:.0f} s; see {LOG_DIR}/")


def run_demo(nodes: int, interval: float, grpc_port: int, http_port: int) -> int:
    grpc_port, http_port = free_port(grpc_port), free_port(http_port)
    target = f"127.0.0.1:{grpc_port}"
    interrupted = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    print(f"Starting a collector and {nodes} simulated nodes ({nodes * GPUS_PER_NODE:,} GPUs)...")
    try:
        with (
            child(
                "collector",
                [
                    "gpufleet.collector.main",
                    "--grpc-listen",
                    target,
                    "--http-listen",
                    f"127.0.0.1:{http_port}",
                    "--db",
                    str(LOG_DIR / "collector.db"),
                    *("--price", DEMO_PRICE),
                ],
            ) as collector,
            child(
                "agents",
                [
                    "gpufleet.agent.main",
                    "--source",
                    "sim",
                    "--nodes",
                    str(nodes),
                    "--interval",
                    str(interval),
                    "--clusters",
                    str(max(2, min(5, nodes // 250))),
                    # Kubernetes pods and Slurm jobs on alternate clusters, some holding GPUs idle.
                    *("--scheduler", "mixed", "--sim-truth-file", str(LOG_DIR / "sim-truth.json")),
                    # A fleet that fails as real ones do, a month's faults in a few hours: a few GPUs
                    # unhealthy and a few at risk from the start.
                    *("--faults", "realistic", "--fault-rate-multiplier", str(DEMO_FAULT_RATE_MULTIPLIER)),
                    "--collector",
                    target,
                ],
            ) as agents,
            FleetClient(target, timeout_s=5.0) as client,
        ):
            took = wait_for_fleet(client, nodes, [collector, agents])
            print(f"\nThe whole fleet reported within {took:.1f} s.\n")
            print(f"  Fleet map           http://127.0.0.1:{http_port}/")
            print(f"  Prometheus metrics  http://127.0.0.1:{http_port}/metrics")
            print(f"  Fleet aggregates    http://127.0.0.1:{http_port}/metrics/fleet")
            print(f"  CLI                 gpufleet summary --collector {target}")
            print(f"                      gpufleet gpus --idle --collector {target}")
            print(f"                      gpufleet jobs --collector {target}")
            print(f"                      gpufleet idle --by namespace --collector {target}")
            print(f"  Logs                {LOG_DIR}/\n")
            print(cmd_summary(client, argparse.Namespace(output="table")))
            print("\nRunning; press Ctrl-C to stop.")
            while collector.poll() is None and agents.poll() is None:
                time.sleep(1)
            print("a child process exited; stopping (see .demo/)", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        interrupted = True
    except RuntimeError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        if interrupted:
            print("\nStopped; no process left behind.")
    return 0
