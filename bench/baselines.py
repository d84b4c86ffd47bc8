"""The baselines, on the same fleet: prometheus_client's generate_latest, and the Pushgateway.

Each runs in a process of its own (`python -m bench.baselines client|pushgateway
--nodes N`) and prints one JSON line. The fleet's series are those the collector
exports for the same nodes (same names, labels and values), rendered here by the
collector's own exposition code from the same reports the load generator sends.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import fleet
from bench.procstat import cpu_seconds, memory_bytes
from gpufleet.collector.exposition import Exposition
from gpufleet.collector.state import FleetState
from gpufleet.v1 import ingest_pb2

PUSHGATEWAY = "prometheus-pushgateway"
_LABEL = re.compile(rb'(\w+)="((?:[^"\\]|\\.)*)"')
_NODE_LABEL = re.compile(rb'node="((?:[^"\\]|\\.)*)"')


def fleet_text(nodes: int, seed: int = 0) -> bytes:
    """Every per-node and per-GPU series of the fleet, as the collector renders them."""
    state = FleetState()
    pool = fleet.body_pool(seed, 10.0)
    for index in range(nodes):
        messages = fleet.NodeMessages(seed, index, 10.0, pool)
        node = state.hello(ingest_pb2.AgentMessage.FromString(messages.hello).hello)
        state.apply_report(node, ingest_pb2.AgentMessage.FromString(messages.report(1)).report)
    return bytes(Exposition(state).nodes())


def families(text: bytes) -> Iterator[tuple[str, str, str, list[tuple[dict[str, str], float]]]]:
    """(name, type, help, [(labels, value)]) for each family of an exposition."""
    name = kind = help_ = ""
    samples: list[tuple[dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith(b"# HELP "):
            if samples:
                yield name, kind, help_, samples
            name, _, rest = line[7:].decode().partition(" ")
            help_, samples = rest, []
        elif line.startswith(b"# TYPE "):
            kind = line.decode().rsplit(" ", 1)[1]
        elif line and not line.startswith(b"#"):
            labels_end = line.rindex(b"}")
            labels = {k.decode(): _unescape(v.decode()) for k, v in _LABEL.findall(line[: labels_end + 1])}
            samples.append((labels, float(line[labels_end + 1 :])))
    if samples:
        yield name, kind, help_, samples


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


# -- prometheus_client ------------------------------------------------------------------


def client_baseline(nodes: int, repeats: int) -> dict[str, object]:
    """Labelled metrics updated for every GPU, then generate_latest: the usual exporter."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest

    disable_created_metrics()  # type: ignore[no-untyped-call]
    text = fleet_text(nodes)
    registry = CollectorRegistry(auto_describe=False)
    started = time.process_time()
    series = 0
    for name, kind, help_, samples in families(text):
        labelnames = list(samples[0][0])
        if kind == "counter":
            counter = Counter(name.removesuffix("_total"), help_, labelnames, registry=registry)
            for labels, value in samples:
                counter.labels(**labels).inc(value)
        else:
            gauge = Gauge(name, help_, labelnames, registry=registry)
            for labels, value in samples:
                gauge.labels(**labels).set(value)
        series += len(samples)
    update_s = time.process_time() - started
    renders = []
    size = 0
    for _ in range(repeats):
        started = time.process_time()
        size = len(generate_latest(registry))
        renders.append(time.process_time() - started)
    return {
        "series": series,
        "update_cpu_s": update_s,
        "render_cpu_s": renders,
        "bytes": size,
        "rss_bytes": memory_bytes(os.getpid())["hwm"],
    }


# -- Pushgateway ------------------------------------------------------------------------


def node_texts(text: bytes) -> dict[str, bytes]:
    """The exposition split by node: what each node would push as its own group."""
    headers: dict[bytes, list[bytes]] = {}
    per_node: dict[str, dict[bytes, list[bytes]]] = defaultdict(lambda: defaultdict(list))
    family = b""
    for line in text.splitlines(keepends=True):
        if line.startswith(b"# HELP "):
            family = line.split(b" ", 3)[2]
            headers[family] = [line]
        elif line.startswith(b"# TYPE "):
            headers[family].append(line)
        else:
            match = _NODE_LABEL.search(line)
            if match:
                per_node[_unescape(match.group(1).decode())][family].append(line)
    return {
        node: b"".join(b"".join(headers[f]) + b"".join(lines) for f, lines in groups.items())
        for node, groups in per_node.items()
    }


class Gateway:
    """A Pushgateway process on a free port."""

    def __init__(self, binary: str, workdir: Path, persistence: Path, consistency_check: bool) -> None:
        self.port = _free_port()
        args = [
            binary,
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--persistence.file={persistence}",
            "--persistence.interval=60m",
            "--log.level=warn",
        ]
        if not consistency_check:
            args.append("--push.disable-consistency-check")
        log = (workdir / f"pushgateway-{self.port}.log").open("wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Pushgateway exited at start; see {log.name}")
            try:
                if self._request("GET", "/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the Pushgateway did not become ready in 120 s")

    def _request(self, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, bytes]:
        """One request on a connection of its own: (status, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def push_all(self, groups: dict[str, bytes], threads: int, deadline_s: float) -> tuple[int, float]:
        """PUT every group (8 clients side by side) until done or ``deadline_s``; (pushed, seconds)."""
        items = list(groups.items())
        pushed = 0
        lock = threading.Lock()
        started = time.monotonic()

        def worker(part: list[tuple[str, bytes]]) -> None:
            nonlocal pushed
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            try:
                for node, body in part:
                    if time.monotonic() - started > deadline_s:
                        return
                    path = f"/metrics/job/gpufleet/node/{urllib.parse.quote(node, safe='')}"
                    connection.request("PUT", path, body=body)
                    response = connection.getresponse()
                    response.read()
                    if response.status >= 300:
                        raise RuntimeError(f"push of {node} failed: HTTP {response.status}")
                    with lock:
                        pushed += 1
            finally:
                connection.close()

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(worker, items[i::threads]) for i in range(threads)]:
                future.result()
        return pushed, time.monotonic() - started

    def scrape(self, gzip: bool) -> tuple[float, float, int]:
        """(seconds, gateway CPU seconds, bytes) of one GET /metrics."""
        cpu = cpu_seconds(self.process.pid)
        started = time.perf_counter()
        headers = {"Accept-Encoding": "gzip"} if gzip else {}
        status, body = self._request("GET", "/metrics", b"", **headers)
        if status != 200:
            raise RuntimeError(f"Pushgateway scrape: HTTP {status}")
        return time.perf_counter() - started, cpu_seconds(self.process.pid) - cpu, len(body)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def pushgateway_baseline(nodes: int, scrapes: int, check_seconds: float) -> dict[str, object]:
    binary = shutil.which(PUSHGATEWAY) or (
        f"/usr/bin/{PUSHGATEWAY}" if os.path.exists(f"/usr/bin/{PUSHGATEWAY}") else ""
    )
    if not binary:
        return {"skipped": f"{PUSHGATEWAY} is not installed (Debian package prometheus-pushgateway)"}
    answer = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version = (answer.stdout or answer.stderr).split("\n")[0]
    groups = node_texts(fleet_text(nodes))
    result: dict[str, object] = {"version": version.strip(), "groups": len(groups)}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-pg-") as tmp:
        workdir = Path(tmp)
        persistence = workdir / "pushgateway.data"
        gateway = Gateway(binary, workdir, persistence, consistency_check=False)
        try:
            cpu = cpu_seconds(gateway.process.pid)
            pushed, seconds = gateway.push_all(groups, threads=8, deadline_s=600)
            result["push_round_s"] = seconds
            result["push_round_cpu_s"] = cpu_seconds(gateway.process.pid) - cpu
            for encoding in ("plain", "gzip"):
                runs = [gateway.scrape(encoding == "gzip") for _ in range(scrapes)]
                result[f"scrape_{encoding}_s"] = [r[0] for r in runs]
                result[f"scrape_{encoding}_cpu_s"] = [r[1] for r in runs]
                result[f"scrape_{encoding}_bytes"] = runs[-1][2]
            result["rss_bytes"] = memory_bytes(gateway.process.pid)["rss"]
        finally:
            gateway.stop()
        # The same groups, already there (from the persistence file), pushed again
        # with the consistency check on: every push gathers and checks everything.
        checked = Gateway(binary, workdir, persistence, consistency_check=True)
        try:
            pushed, seconds = checked.push_all(groups, threads=8, deadline_s=check_seconds)
            result["checked_pushes"] = pushed
            result["checked_push_s"] = seconds
        finally:
            checked.stop()
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=("client", "pushgateway"))
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument(
        "--repeats", type=int, default=3, help="generate_latest calls, or scrapes per encoding"
    )
    parser.add_argument(
        "--check-seconds", type=float, default=20.0, help="time spent pushing with the check on"
    )
    args = parser.parse_args()
    run: Callable[[], dict[str, object]] = (
        (lambda: client_baseline(args.nodes, args.repeats))
        if args.which == "client"
        else (lambda: pushgateway_baseline(args.nodes, args.repeats, args.check_seconds))
    )
    print(json.dumps(run()), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
