"""Properties of everything an agent can send: decoding, limits, clamping, and exposition escaping.

Messages are drawn field by field from the wire contract's descriptors (every
scalar over its whole protobuf range, arbitrary unicode in every string), so a
field added to the .proto is drawn without changing this file. Whatever passes
the limits must reach the fleet's state and come out of /metrics, its shards
and /metrics/dcgm as text that prometheus_client's parser and promtool read
back with the same label values and physically plausible values.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Collection
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.exposition import Exposition, escape_label_value
from gpufleet.collector.limits import LimitExceeded, Limits, check_inventory, check_report, clamp_report
from gpufleet.collector.state import FleetState, NodeIdConflict, NodeRecord
from gpufleet.plausible import PLAUSIBLE
from gpufleet.v1 import allocation_pb2, ingest_pb2, inventory_pb2, telemetry_pb2
from tests.fleet import add_node, dcgm_view, exposition_of, inventory_for
from tests.promtool import check_metrics

M = TypeVar("M", bound=Message)
T = TypeVar("T")

LIMITS = Limits()
SKEW_NS = int(LIMITS.max_clock_skew_s * 1e9)
MIB = 1024 * 1024
# Characters the text format escapes or that delimit it, and a few that tempt a renderer.
HOSTILE = '"\\\n\r\t\x00{}=,#~% '
CHARACTERS = st.one_of(st.sampled_from(HOSTILE), st.characters(codec="utf-8"))
TEXT = st.text(CHARACTERS, max_size=12)


def rarely(usual: st.SearchStrategy[T], rare: st.SearchStrategy[T], one_in: int) -> st.SearchStrategy[T]:
    return st.integers(1, one_in).flatmap(lambda n: rare if n == 1 else usual)


# Now and then a string around the limits (which count characters, not bytes).
STRINGS = rarely(TEXT, st.text(CHARACTERS, min_size=250, max_size=260), 40)
INT_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# GPU indexes: mostly the few a node has, now and then anything.
GPU_INDEX = rarely(st.integers(0, 3), st.integers(0, 2**32 - 1), 10)


def scalars(field: Any) -> st.SearchStrategy[Any]:
    """Any value of a scalar field (its descriptor); in its physical range half the time, if it has one."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return STRINGS
    low, high = INT_RANGES[field.type]  # a KeyError: a new field type, give it a range here
    anything = st.integers(low, high)
    if field.name in PLAUSIBLE:
        return st.one_of(st.integers(*PLAUSIBLE[field.name]), anything)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), anything)
    return st.one_of(st.integers(max(low, 0), 1000), anything)


def messages(
    cls: type[M], required: Collection[str] = (), **fields: st.SearchStrategy[Any]
) -> st.SearchStrategy[M]:
    """Messages of ``cls`` with any of their fields set (``required`` always); ``fields`` overrides."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in cls.DESCRIPTOR.fields:
        message_type = field.message_type
        if field.name in fields:
            optional[field.name] = fields[field.name]
        elif message_type is not None and message_type.GetOptions().map_entry:
            key, value = message_type.fields_by_name["key"], message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(scalars(key), scalars(value), max_size=3)
        elif message_type is not None:
            raise AssertionError(f"give messages() a strategy for {cls.__name__}.{field.name}")
        elif field.is_repeated:
            optional[field.name] = st.lists(scalars(field), max_size=3)
        else:
            optional[field.name] = scalars(field)
    always = {name: optional.pop(name) for name in required}
    return st.fixed_dictionaries(always, optional=optional).map(lambda kwargs: cls(**kwargs))


GPU_INVENTORIES = messages(
    inventory_pb2.GpuInventory,
    index=GPU_INDEX,
    mig_instances=st.lists(messages(inventory_pb2.MigInventory), max_size=2),
)
ALLOCATIONS = messages(
    allocation_pb2.Allocations,
    allocations=st.lists(messages(allocation_pb2.Allocation, gpu_index=GPU_INDEX), max_size=4),
    sources=st.lists(messages(allocation_pb2.AttributionSource), max_size=2),
)
# Node ids and hostnames drawn from small sets too, so that nodes say hello again, reboot,
# conflict, share hostnames, and take a hostname equal to another node's id (or a "~" name).
SHORT = st.text(CHARACTERS, max_size=5)
INVENTORIES = messages(
    inventory_pb2.NodeInventory,
    required=("node_id", "hostname"),
    node_id=rarely(
        st.one_of(st.sampled_from(["id:1", "id:2", "h", "h~id:1"]), SHORT.map(lambda text: "id:" + text)),
        st.text(CHARACTERS, min_size=LIMITS.max_string_length + 1, max_size=LIMITS.max_string_length + 4),
        40,
    ),
    hostname=st.one_of(st.sampled_from(["", "h", "id:1", "h~id:1"]), SHORT),
    gpus=st.lists(GPU_INVENTORIES, max_size=3),
)
HELLOS = messages(
    ingest_pb2.Hello,
    required=("protocol_version", "inventory"),
    protocol_version=rarely(st.just(wire.PROTOCOL_VERSION), st.integers(0, 2**32 - 1), 10),
    inventory=INVENTORIES,
    allocations=ALLOCATIONS,
)
GPU_PROCESS_LISTS = messages(
    telemetry_pb2.ProcessList, processes=st.lists(messages(telemetry_pb2.GpuProcess), max_size=3)
)
GPU_SAMPLES = messages(
    telemetry_pb2.GpuSample,
    index=GPU_INDEX,
    xid_events=st.lists(messages(telemetry_pb2.XidEvent), max_size=3),
    processes=GPU_PROCESS_LISTS,
    mig_instances=st.lists(messages(telemetry_pb2.MigSample, processes=GPU_PROCESS_LISTS), max_size=2),
)
REPORTS = messages(
    ingest_pb2.Report,
    gpus=st.lists(GPU_SAMPLES, max_size=4),
    agent_stats=messages(telemetry_pb2.AgentStats),
    inventory=INVENTORIES,
    allocations=ALLOCATIONS,
)


def seed_messages() -> list[bytes]:
    """A valid Hello and Report from the simulator, serialized: what mutations start from."""
    source = SimulatedSource("H100", 2, seed=3)
    source.inject_xid(0, 79)
    hello = ingest_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, inventory=inventory_for(source, 1))
    report = ingest_pb2.Report(
        sequence=2, time_unix_nano=time.time_ns(), gpus=source.sample(with_processes=True)
    )
    return [
        ingest_pb2.AgentMessage(hello=hello).SerializeToString(),
        ingest_pb2.AgentMessage(report=report).SerializeToString(),
    ]


SEEDS = seed_messages()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed message with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, len(data)))
        if operation == "flip" and data:
            data[min(position, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


AGENT_MESSAGES = st.one_of(
    HELLOS.map(lambda hello: ingest_pb2.AgentMessage(hello=hello)),
    REPORTS.map(lambda report: ingest_pb2.AgentMessage(report=report)),
)
RAW = st.one_of(st.binary(max_size=300), mutated(), AGENT_MESSAGES.map(lambda m: m.SerializeToString()))


def take_in(state: FleetState, node: NodeRecord, raw: bytes, now_ns: int) -> None:
    """What ingest does with one message of a stream, short of gRPC: parse, check, clamp, apply."""
    message = ingest_pb2.AgentMessage()
    message.ParseFromString(raw)
    if message.WhichOneof("kind") == "hello":
        check_inventory(message.hello.inventory, LIMITS)
        if message.hello.inventory.node_id:
            state.hello(message.hello)
    elif message.WhichOneof("kind") == "report":
        report = message.report
        check_report(report, LIMITS)
        clamp_report(report, now_ns, LIMITS)
        state.apply_report(node, report)


@settings(max_examples=1000, deadline=None)
@given(raw=RAW)
def test_any_bytes_are_taken_in_or_refused_with_the_documented_errors(raw: bytes) -> None:
    state = FleetState()
    node = add_node(state, SimulatedSource("H100", 2, seed=0), 0)
    try:
        take_in(state, node, raw, time.time_ns())
    except (DecodeError, LimitExceeded, NodeIdConflict):
        return
    exposition_of(state).everything()
    dcgm_view(state).render()


# -- whatever passes the limits reaches the exposition, escaped and plausible ----------------


def say_hello(state: FleetState, hellos: list[ingest_pb2.Hello]) -> list[NodeRecord]:
    """The nodes whose hello passes the checks ingest makes."""
    nodes = []
    for hello in hellos:
        if hello.protocol_version != wire.PROTOCOL_VERSION or not hello.inventory.node_id:
            continue
        try:
            check_inventory(hello.inventory, LIMITS)
            nodes.append(state.hello(hello))
        except (LimitExceeded, NodeIdConflict):
            continue
    return nodes


def send(state: FleetState, nodes: list[NodeRecord], reports: list[ingest_pb2.Report]) -> None:
    """Each report that passes the limits goes to a node in turn, as its next one, clamped."""
    for turn, report in enumerate(reports):
        if not nodes:
            return
        node = nodes[turn % len(nodes)]
        report.sequence = node.last_sequence + 1
        try:
            check_report(report, LIMITS)
        except LimitExceeded:
            continue
        clamp_report(report, time.time_ns(), LIMITS)
        state.apply_report(node, report)


def parse(body: bytes) -> list[Sample]:
    """Every sample (the parser adds _total to the samples of counters named without it)."""
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def series(samples: list[Sample]) -> Counter[tuple[str, tuple[tuple[str, str], ...]]]:
    return Counter((s.name, tuple(sorted(s.labels.items()))) for s in samples)


# Exported series of a plausibility-checked field: (field, factor from the field's unit).
IN_RANGE: dict[str, tuple[str, float]] = {
    "gpufleet_gpu_utilization_ratio": ("gpu_utilization_percent", 0.01),
    "gpufleet_gpu_memory_copy_utilization_ratio": ("memory_copy_utilization_percent", 0.01),
    "gpufleet_gpu_encoder_utilization_ratio": ("encoder_utilization_percent", 0.01),
    "gpufleet_gpu_decoder_utilization_ratio": ("decoder_utilization_percent", 0.01),
    "gpufleet_gpu_fan_speed_ratio": ("fan_speed_percent", 0.01),
    "gpufleet_gpu_temperature_celsius": ("gpu_temperature_celsius", 1),
    "gpufleet_gpu_memory_temperature_celsius": ("memory_temperature_celsius", 1),
    "gpufleet_gpu_power_watts": ("power_draw_milliwatts", 1e-3),
    "gpufleet_gpu_sm_clock_hertz": ("sm_clock_mhz", 1e6),
    "gpufleet_gpu_memory_clock_hertz": ("memory_clock_mhz", 1e6),
    "gpufleet_gpu_performance_state": ("performance_state", 1),
    "gpufleet_gpu_memory_used_bytes": ("memory_used_bytes", 1),
    "gpufleet_gpu_memory_free_bytes": ("memory_free_bytes", 1),
    "gpufleet_gpu_memory_reserved_bytes": ("memory_reserved_bytes", 1),
    "gpufleet_gpu_recovery_action": ("recovery_action", 1),
    "gpufleet_fleet_gpu_utilization_mean_ratio": ("gpu_utilization_percent", 0.01),
    "DCGM_FI_DEV_SM_CLOCK": ("sm_clock_mhz", 1),
    "DCGM_FI_DEV_MEM_CLOCK": ("memory_clock_mhz", 1),
    "DCGM_FI_DEV_GPU_TEMP": ("gpu_temperature_celsius", 1),
    "DCGM_FI_DEV_MEMORY_TEMP": ("memory_temperature_celsius", 1),
    "DCGM_FI_DEV_POWER_USAGE": ("power_draw_milliwatts", 1e-3),
    "DCGM_FI_DEV_GPU_UTIL": ("gpu_utilization_percent", 1),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("memory_copy_utilization_percent", 1),
    "DCGM_FI_DEV_ENC_UTIL": ("encoder_utilization_percent", 1),
    "DCGM_FI_DEV_DEC_UTIL": ("decoder_utilization_percent", 1),
    "DCGM_FI_DEV_FB_USED": ("memory_used_bytes", 1 / MIB),
    "DCGM_FI_DEV_FB_FREE": ("memory_free_bytes", 1 / MIB),
    "DCGM_FI_DEV_FB_RESERVED": ("memory_reserved_bytes", 1 / MIB),
}


def assert_plausible(samples: list[Sample], gpus: int) -> None:
    for s in samples:
        assert math.isfinite(s.value), s
        if s.name in IN_RANGE:
            field, factor = IN_RANGE[s.name]
            low, high = PLAUSIBLE[field]
            assert low * factor - 1e-9 <= s.value <= high * factor + 1e-9, s
        if s.name == "gpufleet_fleet_power_watts":
            assert 0 <= s.value <= gpus * PLAUSIBLE["power_draw_milliwatts"][1] / 1000, s


def assert_labels_round_trip(state: FleetState, samples: list[Sample]) -> None:
    """Every label value an agent chose comes back exactly as it sent it."""
    names = {node.name for node in state.nodes()}
    assert {s.labels["node"] for s in samples if "node" in s.labels} == names
    clusters = {node.inventory.cluster for node in state.nodes()}
    assert {s.labels["cluster"] for s in samples if s.name.startswith("gpufleet_fleet_")} <= clusters
    models = {gpu.model for node in state.nodes() for gpu in node.gpus.values()}
    assert {
        s.labels["model"] for s in samples if s.name.startswith("gpufleet_fleet_") and "model" in s.labels
    } <= models
    by_node = {s.labels["node"]: s.labels for s in samples if s.name == "gpufleet_node_info"}
    gpu_info = {
        (s.labels["node"], s.labels["gpu"]): s.labels for s in samples if s.name == "gpufleet_gpu_info"
    }
    for node in state.nodes():
        inventory = node.inventory
        assert by_node[node.name] == {
            "node": node.name,
            "node_id": node.node_id,
            "hostname": inventory.hostname,
            "datacenter": inventory.datacenter,
            "cluster": inventory.cluster,
            "rack": inventory.rack,
            "driver_version": inventory.driver_version,
            "cuda_version": inventory.cuda_version,
            "agent_version": inventory.agent_version,
        }
        for gpu in node.gpus.values():
            labels = gpu_info[(node.name, str(gpu.inventory.index))]
            assert (labels["uuid"], labels["serial"], labels["model"], labels["pci_bus_id"]) == (
                gpu.inventory.uuid,
                gpu.inventory.serial,
                gpu.model,
                gpu.inventory.pci_bus_id,
            )
            assert labels["driver_version"] == inventory.driver_version


def assert_dcgm_labels_round_trip(state: FleetState, samples: list[Sample]) -> None:
    by_name = {node.name: node for node in state.nodes()}
    for s in samples:
        node = by_name[s.labels["Hostname"]]
        gpu = node.gpus[int(s.labels["gpu"])]
        assert (s.labels["UUID"], s.labels["pci_bus_id"], s.labels["modelName"]) == (
            gpu.inventory.uuid,
            gpu.inventory.pci_bus_id,
            gpu.inventory.name,
        )
        assert s.labels["DCGM_FI_DRIVER_VERSION"] == node.inventory.driver_version


def assert_exposition_reads_back(state: FleetState, exposition: Exposition) -> None:
    gpus = sum(len(node.gpus) for node in state.nodes())
    whole = parse(bytes(exposition.everything()))
    assert not [key for key, count in series(whole).items() if count > 1]
    assert_labels_round_trip(state, whole)
    assert_plausible(whole, gpus)
    per_node = series(parse(bytes(exposition.nodes())))
    for shards in (2, 3):
        shard_series = sum(
            (series(parse(bytes(exposition.nodes(i, shards)))) for i in range(shards)), Counter()
        )
        assert shard_series == per_node, f"{shards} shards"
    dcgm_samples = parse(dcgm_view(state).render())
    assert not [key for key, count in series(dcgm_samples).items() if count > 1]
    assert_dcgm_labels_round_trip(state, dcgm_samples)
    assert_plausible(dcgm_samples, gpus)


HEAVY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@HEAVY
@given(
    hellos=st.lists(HELLOS, min_size=1, max_size=3),
    reports=st.lists(REPORTS, max_size=4),
    silent_s=st.sampled_from([0.0, 35.0, 110.0]),
)
def test_whatever_passes_the_limits_is_exported_as_sent_and_plausible(
    hellos: list[ingest_pb2.Hello], reports: list[ingest_pb2.Report], silent_s: float
) -> None:
    now = [1000.0]
    state = FleetState(clock=lambda: now[0])
    exposition = exposition_of(state)
    assert_exposition_reads_back(state, exposition)
    nodes = say_hello(state, hellos)
    assert_exposition_reads_back(state, exposition)
    send(state, nodes, reports)
    assert_exposition_reads_back(state, exposition)
    now[0] += silent_s
    state.sweep()  # stale or down nodes
    assert_exposition_reads_back(state, exposition)
    # What was kept and rendered again where it changed equals a render from scratch.
    fresh = exposition_of(state)
    assert series(parse(bytes(exposition.everything()))) == series(parse(bytes(fresh.everything())))


# promtool, the parser Prometheus itself uses, on a handful of fleets with any labels.
DCGM_NAMING = re.compile(
    r"^DCGM_FI_\w+ (counter metrics should have \"_total\" suffix"
    r"|label names should be written in 'snake_case' not 'camelCase'"
    r"|metric name should not include type 'counter')$"
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(hellos=st.lists(HELLOS, min_size=1, max_size=3), reports=st.lists(REPORTS, min_size=1, max_size=3))
def test_promtool_parses_the_exposition_whatever_the_labels(
    hellos: list[ingest_pb2.Hello], reports: list[ingest_pb2.Report]
) -> None:
    state = FleetState()
    send(state, say_hello(state, hellos), reports)
    exposition = exposition_of(state)
    assert check_metrics(bytes(exposition.everything())) == ""
    assert check_metrics(bytes(exposition.nodes(1, 2))) == ""
    findings = check_metrics(dcgm_view(state).render()).splitlines()
    assert all(DCGM_NAMING.match(line) for line in findings), findings


# -- clamping and escaping -------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(report=REPORTS, now_ns=st.integers(0, 2**63))
def test_clamping_leaves_nothing_implausible_or_beyond_now_plus_skew(
    report: ingest_pb2.Report, now_ns: int
) -> None:
    before = ingest_pb2.Report()
    before.CopyFrom(report)
    touched = clamp_report(report, now_ns, LIMITS)
    latest = now_ns + SKEW_NS
    assert report.time_unix_nano <= latest
    changed = int(report.time_unix_nano != before.time_unix_nano)
    for gpu, old in zip(report.gpus, before.gpus, strict=True):
        for name, (low, high) in PLAUSIBLE.items():
            assert not gpu.HasField(name) or low <= getattr(gpu, name) <= high
            changed += gpu.HasField(name) != old.HasField(name)
        for event, old_event in zip(gpu.xid_events, old.xid_events, strict=True):
            assert event.time_unix_nano <= latest
            changed += event.time_unix_nano != old_event.time_unix_nano
    # Every value it touched is counted, and whatever was plausible is left as it was.
    assert touched == changed
    assert clamp_report(report, now_ns, LIMITS) == 0


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


@settings(max_examples=300, deadline=None)
@given(value=st.text(CHARACTERS))
def test_escaped_label_values_parse_back_to_themselves(value: str) -> None:
    escaped = escape_label_value(value)
    assert "\n" not in escaped
    assert re.fullmatch(r'(?:[^"\\\n]|\\[\\"n])*', escaped, re.DOTALL)
    assert unescape(escaped) == value
    [family] = text_string_to_metric_families(f'm{{a="{escaped}",b="x"}} 1\n')
    assert [(s.labels, s.value) for s in family.samples] == [({"a": value, "b": "x"}, 1)]


@settings(max_examples=5, deadline=None)
@given(values=st.lists(st.text(CHARACTERS, min_size=1), min_size=1, max_size=20, unique=True))
def test_promtool_parses_any_escaped_label_value(values: list[str]) -> None:
    body = "# HELP m_info Label values.\n# TYPE m_info gauge\n" + "".join(
        f'm_info{{value="{escape_label_value(value)}"}} 1\n' for value in values
    )
    assert check_metrics(body.encode()) == ""


# -- what the properties found: pinned until fixed (strict, so a fix shows here) --------------


def hello_from(state: FleetState, node_id: str, hostname: str) -> NodeRecord:
    inventory = inventory_pb2.NodeInventory(
        node_id=node_id, hostname=hostname, gpus=[inventory_pb2.GpuInventory(index=0, uuid=f"GPU-{node_id}")]
    )
    return state.hello(ingest_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, inventory=inventory))


def test_three_hosts_of_one_name_get_three_names() -> None:
    state = FleetState()
    nodes = [hello_from(state, f"abcdefgh-{index}", "h") for index in range(3)]
    assert len({node.name for node in nodes}) == 3
    assert not [
        key for key, count in series(parse(bytes(exposition_of(state).everything()))).items() if count > 1
    ]


def test_a_node_is_found_by_its_name_whatever_ids_others_chose() -> None:
    state = FleetState()
    named = hello_from(state, "a1", "web-1")
    hello_from(state, "web-1", "x")
    assert state.find("web-1") is named


def test_forgetting_a_node_leaves_no_duplicate_in_the_dcgm_view() -> None:
    state = FleetState()
    dcgm_view(state).render()
    forgotten = hello_from(state, "k", "hk")
    hello_from(state, "z", "k")
    dcgm_view(state).render()
    state.disconnected(forgotten)
    state.forget(forgotten)
    assert not [key for key, count in series(parse(dcgm_view(state).render())).items() if count > 1]
