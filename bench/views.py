"""`python -m bench.views`: what the fleet map and `gpufleet top` cost, at 10,000 GPUs.

A collector under 1,250 nodes reporting every 10 s (bench/load.py), then:

1. the map's first load: bytes of `/api/fleet` (plain and gzip) and, in Chromium, the time from
   asking for the page to every cell drawn (median of 3);
2. the map's updates: bytes per second of one page's server-sent events;
3. collector CPU with nothing open, then with 10 pages following the stream and 10 `gpufleet
   top` refreshing (what one refresh asks: the summary, one page of GPUs and the workloads by
   cluster, every 2 s each): the ratio;
4. ingest (reports acknowledged per second, collector CPU) with no page open and with 500.

Prints a table and a JSON line; docs/benchmarks.md ("Views") holds the numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import selectors
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.procstat import cpu_seconds
from bench.tier import Load, collector
from gpufleet.cli.client import FleetClient
from gpufleet.v1 import query_pb2
from tests.conftest import http_get, wait_until

NODES = 1250
PAGES = 10
TOPS = 10
TOP_REFRESH_S = 2.0
# Open pages (event streams) during the ingest measurement.
MANY = 500
LOAD_TARGET_S = 1.0


def _stream_bytes(base: str, seconds: float, stop: threading.Event | None = None) -> int:
    """Bytes one page's event stream brings in ``seconds`` (or until ``stop``)."""
    host, port = base.removeprefix("http://").split(":")
    received = 0
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /api/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        sock.settimeout(0.5)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            received += len(chunk)
    return received


def _streams(base: str, count: int, stop: threading.Event, opened: list[int]) -> None:
    """``count`` pages' event streams on one thread (select), read and dropped until ``stop``."""
    host, port = base.removeprefix("http://").split(":")
    selector = selectors.DefaultSelector()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"GET /api/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        sockets.append(sock)
    answered: set[socket.socket] = set()
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                data = ready.recv(262144)
            except BlockingIOError:
                continue
            if data.startswith(b"HTTP/1.1 200"):
                answered.add(ready)
            if not data:
                selector.unregister(ready)
        opened[:] = [len(answered)]
    for sock in sockets:
        sock.close()


def _ingest_with_streams(pid: int, base: str, load: Load, count: int, window_s: float) -> dict[str, float]:
    """Reports acknowledged per second and collector CPU with ``count`` streams open."""
    stop, opened = threading.Event(), [0]
    reader = threading.Thread(target=_streams, args=(base, count, stop, opened), daemon=True)
    if count:
        reader.start()
        time.sleep(3)
    acked, cpu, started = load.acked(), cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - started
    result = {
        "streams": opened[0],
        "reports_per_s": (load.acked() - acked) / elapsed,
        "cpu_cores": (cpu_seconds(pid) - cpu) / elapsed,
    }
    stop.set()
    if count:
        reader.join(timeout=10)
    return result


def _top(target: str, stop: threading.Event) -> None:
    with FleetClient(target) as client:
        while not stop.is_set():
            client.summary()
            client._call("ListGpus", query_pb2.ListGpusRequest(sort_by="-temperature", page_size=20))
            client.workloads(query_pb2.ListWorkloadsRequest(group_by="cluster"))
            stop.wait(TOP_REFRESH_S)


def page_load(base: str, gpus: int, rounds: int = 3) -> list[float]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        return []
    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(rounds):
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
            started = time.monotonic()
            page.goto(base + "/")
            page.wait_for_function(f"() => window.gpufleetMap && window.gpufleetMap.cells === {gpus}")
            times.append(time.monotonic() - started)
            page.close()
        browser.close()
    return times


def _cpu(pid: int, seconds: float) -> float:
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def _viewed(pid: int, base: str, target: str, pages: int, tops: int, window_s: float) -> float:
    """Collector CPU (cores) while ``pages`` pages follow the stream and ``tops`` tops refresh."""
    stop = threading.Event()
    workers = [
        threading.Thread(target=_stream_bytes, args=(base, window_s * 3, stop), daemon=True)
        for _ in range(pages)
    ] + [threading.Thread(target=_top, args=(target, stop), daemon=True) for _ in range(tops)]
    for worker in workers:
        worker.start()
    time.sleep(2)
    cores = _cpu(pid, window_s)
    stop.set()
    for worker in workers:
        worker.join(timeout=10)
    return cores


def measure(window_s: float, nodes: int = NODES) -> dict[str, Any]:
    result: dict[str, Any] = {"gpus": nodes * 8}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-views-") as scratch:
        workdir = Path(scratch)
        # Room for MANY open pages (the default caps HTTP connections at 256).
        room = ("--http-max-connections", str(MANY + 64), "--http-max-connections-per-peer", str(MANY + 64))
        with collector(workdir, "none", *room) as (process, target, base):
            load = Load(workdir, target, nodes, 10.0)
            try:
                wait_until(
                    lambda: load.status.get("connected") == nodes, timeout=180, what="the load connected"
                )
                wait_until(
                    lambda: (
                        sum(len(n["gpus"]) for n in json.loads(http_get(f"{base}/api/fleet")[1])["nodes"])
                        == nodes * 8
                    ),
                    timeout=60,
                    what="every GPU on the map",
                )
                plain = http_get(f"{base}/api/fleet")[1]
                zipped = http_get(f"{base}/api/fleet", headers={"Accept-Encoding": "gzip"})[1]
                result["fleet_bytes"] = len(plain)
                result["fleet_gzip_bytes"] = (
                    len(zipped) if zipped[:2] == b"\x1f\x8b" else len(gzip.compress(plain))
                )
                loads = page_load(base, nodes * 8)
                result["page_load_s"] = statistics.median(loads) if loads else None
                result["stream_bytes_per_s"] = _stream_bytes(base, window_s) / window_s
                result["cpu_idle_cores"] = _cpu(process.pid, window_s)
                for name, pages, tops in (("pages", PAGES, 0), ("tops", 0, TOPS), ("viewed", PAGES, TOPS)):
                    result[f"cpu_{name}_cores"] = _viewed(process.pid, base, target, pages, tops, window_s)
                result["ingest_no_streams"] = _ingest_with_streams(process.pid, base, load, 0, window_s)
                result["ingest_many_streams"] = _ingest_with_streams(process.pid, base, load, MANY, window_s)
            finally:
                load.stop()
    result["cpu_ratio"] = result["cpu_viewed_cores"] / max(result["cpu_idle_cores"], 1e-9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.views",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds each measurement lasts")
    parser.add_argument("--nodes", type=int, default=NODES, help="nodes of 8 GPUs (default 1,250)")
    args = parser.parse_args()
    result = measure(args.window, args.nodes)
    load = result["page_load_s"]
    print(
        f"/api/fleet at {result['gpus']:,} GPUs: {result['fleet_bytes']:,} bytes, "
        f"{result['fleet_gzip_bytes']:,} gzip"
    )
    if load is None:
        print("page load: chromium not installed, not measured")
    else:
        verdict = "met" if load <= LOAD_TARGET_S else "NOT met"
        print(f"page load to every cell drawn: {load:.2f} s (target <= {LOAD_TARGET_S:.0f} s): {verdict}")
    print(f"updates: {result['stream_bytes_per_s']:,.0f} bytes/s per page")
    print(
        f"collector CPU: {result['cpu_idle_cores']:.3f} cores with nothing open; "
        f"{result['cpu_pages_cores']:.3f} with {PAGES} pages, "
        f"{result['cpu_tops_cores']:.3f} with {TOPS} tops, "
        f"{result['cpu_viewed_cores']:.3f} with both: {result['cpu_ratio']:.2f}x"
    )
    quiet, busy = result["ingest_no_streams"], result["ingest_many_streams"]
    print(
        f"ingest: {quiet['reports_per_s']:.0f} reports/s ({quiet['cpu_cores']:.3f} cores) with no page open, "
        f"{busy['reports_per_s']:.0f} reports/s ({busy['cpu_cores']:.3f} cores) "
        f"with {busy['streams']:.0f} streams"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
