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
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import agent_cost, fleet
from bench.load import raise_open_files_limit
from bench.processes import MIB, ROOT, Children, Failure, Settings
from bench.procstat import load_average
from bench.scenario import GuestAgent, Scenario

__all__ = ["ROOT", "Failure", "Report", "Settings", "run", "terminate_cleanly"]

# -- the whole run ------------------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    started: float = field(default_factory=time.time)
    environment: dict[str, str] = field(default_factory=dict)
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    guest: dict[str, float] = field(default_factory=dict)
    # The agent's CPU per GPU per interval for NVML GPM, on the fake NVML (bench/agent_cost.py).
    gpm: dict[str, float] = field(default_factory=dict)
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
        report.gpm = agent_cost.gpm_sample_cost()
        print(f"agent GPM sampling: {report.gpm['gpm_us']:.0f} us of CPU per GPU per interval", flush=True)
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
