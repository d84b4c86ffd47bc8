"""The ingest path driven as a real stream drives it, and the checks of what comes out of it.

Used by the coverage-guided fuzz target (``ingest_fuzz.py``, atheris) and by the
tests: arbitrary bytes go where an agent's stream goes, ``IngestServicer.Connect``,
which parses each message, checks the Hello and every Report against the limits,
clamps and applies reports to a ``FleetState``; after every message the exposition
(``/metrics``, its shards, ``/metrics/fleet``, ``/metrics/dcgm``) is rendered and
checked. The documented outcomes are an acknowledgement or a gRPC status the
servicer aborts the stream with; any other exception, an invalid exposition, a
value outside physical ranges or a timestamp from the future fails.

An input is a sequence of frames in gRPC's own framing (a flag byte, a 4-byte
big-endian length, the message), the flag byte reused to steer the streams:
bits 0-1 pick one of four streams (opened by its first message), bit 4 closes
that stream first (the agent hangs up), bit 5 moves the clock a minute on and
sweeps liveness first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.dcgm import DcgmExposition
from gpufleet.collector.exposition import Exposition
from gpufleet.collector.ingest import IngestServicer
from gpufleet.collector.limits import Limits
from gpufleet.collector.selfmetrics import CollectorMetrics
from gpufleet.collector.state import FleetState
from gpufleet.plausible import PLAUSIBLE
from gpufleet.v1 import ingest_pb2

STREAMS = 4
MAX_FRAMES = 64
CLOSE = 0x10
ADVANCE = 0x20
ADVANCE_S = 60.0
# The statuses a servicer answers bad input with (with --bind-node-id-to-certificate
# off, and no stream waits long enough for a hello timeout).
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
LIMITS = Limits()

_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?Inf|NaN"
SAMPLE_LINE = re.compile(rf"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{{{_LABEL}(?:,{_LABEL})*\}})?) ({_NUMBER})")
HELP_LINE = re.compile(r"# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) [^\n]*")
TYPE_LINE = re.compile(r"# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|untyped|summary|histogram)")


class Aborted(Exception):
    """What ``context.abort`` raises in grpc.aio: the stream ends with ``code``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class Context:
    """The part of grpc.aio.ServicerContext the ingest servicer uses."""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()) -> None:
        raise Aborted(code, details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class ErrorLog(logging.Handler):
    """Keeps every record at ERROR or above: the exposition logs a failed background render."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ERRORS = ErrorLog()
METRICS = CollectorMetrics()


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(flag, message) frames; a length past the end takes what is left."""
    out: list[tuple[int, bytes]] = []
    position = 0
    while position < len(data) and len(out) < MAX_FRAMES:
        flag = data[position]
        length = int.from_bytes(data[position + 1 : position + 5], "big")
        start = position + 5
        out.append((flag, data[start : start + length]))
        position = start + length
    return out


def frame(flag: int, message: bytes) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


class Stream:
    """One agent stream, driven a message at a time: each message is answered or ends the stream."""

    def __init__(self, servicer: IngestServicer, context: Context) -> None:
        self._queue: deque[bytes] = deque()
        self._answers = servicer.Connect(self._requests(), context)

    async def _requests(self) -> AsyncIterator[bytes]:
        while self._queue:
            yield self._queue.popleft()

    async def send(self, raw: bytes) -> bool:
        """Send one message; False when the stream ended (refused, as documented)."""
        self._queue.append(raw)
        try:
            answer = await self._answers.__anext__()
        except StopAsyncIteration:
            raise AssertionError("the stream ended without an answer or a status") from None
        except Aborted as exc:
            if exc.code not in DOCUMENTED:
                raise
            return False
        assert answer.WhichOneof("kind") in ("hello_ack", "report_ack"), answer
        return True

    async def close(self) -> None:
        """The agent hangs up: no more requests."""
        try:
            await self._answers.__anext__()
        except StopAsyncIteration:
            return
        raise AssertionError("the stream answered after its requests ended")


def check_text(body: bytes, where: str) -> None:
    """A valid text exposition: every line parses, families are grouped, no series twice."""
    families: set[str] = set()
    series: set[str] = set()
    family = ""
    for line in body.decode().split("\n")[:-1]:
        if line.startswith("# HELP "):
            match = HELP_LINE.fullmatch(line)
            assert match, f"{where}: bad HELP line {line!r}"
            continue
        if line.startswith("# TYPE "):
            match = TYPE_LINE.fullmatch(line)
            assert match, f"{where}: bad TYPE line {line!r}"
            family = match.group(1)
            assert family not in families, f"{where}: family {family} twice"
            families.add(family)
            continue
        match = SAMPLE_LINE.fullmatch(line)
        assert match, f"{where}: not a sample line {line!r}"
        name = match.group(1).partition("{")[0]
        assert name == family, f"{where}: {name} outside its family ({family})"
        assert match.group(1) not in series, f"{where}: series twice: {match.group(1)!r}"
        series.add(match.group(1))
    assert not body or body.endswith(b"\n"), f"{where}: no final newline"


def check_state(state: FleetState) -> None:
    """Nothing implausible or from the future was taken in; no two nodes share a name."""
    latest = time.time_ns() + int(LIMITS.max_clock_skew_s * 1e9)
    names = [node.name for node in state.nodes()]
    assert len(names) == len(set(names)), f"two nodes under one name: {sorted(names)}"
    for node in state.nodes():
        for gpu in node.gpus.values():
            sample = gpu.sample
            if sample is None:
                continue
            for name, (low, high) in PLAUSIBLE.items():
                assert not sample.HasField(name) or low <= getattr(sample, name) <= high, (name, sample)
            assert all(event.time_unix_nano <= latest for event in sample.xid_events), sample


def check_exposition(state: FleetState, exposition: Exposition, shards: int = 3) -> None:
    check_text(DcgmExposition(state).render(), "/metrics/dcgm")
    whole = bytes(exposition.everything())
    check_text(whole, "/metrics")
    check_text(exposition.fleet(), "/metrics/fleet")
    if shards:
        lines = sorted(whole.decode().split("\n")[:-1])
        parts = [bytes(exposition.nodes(shard, shards)).decode() for shard in range(shards)]
        for shard, part in enumerate(parts):
            check_text(part.encode(), f"/metrics/nodes?shard={shard}&shards={shards}")
        pieces = [line for part in parts for line in part.split("\n")[:-1]]
        sample_lines = sorted(line for line in pieces if not line.startswith("#"))
        fleet = [line for line in exposition.fleet().decode().split("\n")[:-1] if not line.startswith("#")]
        whole_samples = [line for line in lines if not line.startswith("#")]
        assert sorted(sample_lines + fleet) == whole_samples, "the shards do not add up to /metrics"


async def run_stream_input(data: bytes) -> FleetState:
    now = [1_000_000.0]
    state = FleetState(clock=lambda: now[0])
    exposition = Exposition(state)
    state.sinks.add(exposition)
    exposition.REFRESH_DELAY_S = 3600.0  # rendered here, on demand, so that errors surface
    servicer = IngestServicer(state, METRICS)
    context = Context()
    streams: dict[int, Stream] = {}
    for flag, message in frames(data):
        slot = flag % STREAMS
        if flag & CLOSE and slot in streams:
            await streams.pop(slot).close()
        if flag & ADVANCE:
            now[0] += ADVANCE_S
            state.sweep()
        stream = streams.get(slot)
        if stream is None:
            stream = streams[slot] = Stream(servicer, context)
        if not await stream.send(message):
            del streams[slot]
        check_exposition(state, exposition, shards=0)
    for stream in streams.values():
        await stream.close()
    check_state(state)
    check_exposition(state, exposition)
    return state


def one_input(data: bytes) -> FleetState:
    """One input: its streams against a fresh collector; the fleet they leave behind."""
    ERRORS.records.clear()
    root = logging.getLogger()
    root.addHandler(ERRORS)
    try:
        state = asyncio.run(run_stream_input(data))
    finally:
        root.removeHandler(ERRORS)
    assert not ERRORS.records, [record.getMessage() for record in ERRORS.records]
    return state


def quiet() -> None:
    """Rejections are expected by the thousand: the collector logs only errors while fuzzing."""
    logging.getLogger("gpufleet.collector").setLevel(logging.ERROR)


def seeds() -> list[bytes]:
    """Valid inputs from the simulator: streams of two nodes, a reconnect, a sweep, XIDs."""
    hellos: list[bytes] = []
    reports: list[list[bytes]] = []
    for index in range(2):
        source = SimulatedSource("H100", 2, seed=index, node_index=index)
        inventory = source.inventory()
        inventory.node_id = hashlib.sha256(f"node-{index}".encode()).hexdigest()[:32]
        inventory.hostname = f'node-{index}"\\\n'
        inventory.boot_id = "boot-1"
        inventory.cluster = "c1"
        inventory.labels["rack"] = "r1"
        hello = ingest_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, inventory=inventory)
        hellos.append(ingest_pb2.AgentMessage(hello=hello).SerializeToString())
        source.inject_xid(1, 79)
        reports.append(
            [
                ingest_pb2.AgentMessage(
                    report=ingest_pb2.Report(
                        sequence=sequence,
                        time_unix_nano=time.time_ns(),
                        gpus=source.sample(with_processes=sequence == 1),
                    )
                ).SerializeToString()
                for sequence in (1, 2)
            ]
        )
    one_node = frame(0, hellos[0]) + b"".join(frame(0, report) for report in reports[0])
    two_nodes = frame(0, hellos[0]) + frame(1, hellos[1]) + frame(0, reports[0][0]) + frame(1, reports[1][0])
    reconnect = one_node + frame(CLOSE, hellos[0]) + frame(ADVANCE, reports[0][1])
    return [one_node, two_nodes, reconnect, frame(ADVANCE | 2, hellos[1]) + frame(2, reports[1][1])]


def write_seeds(directory: Path) -> None:
    for seed in seeds():
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
