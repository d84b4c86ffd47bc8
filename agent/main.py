"""gpufleet-agent: the per-host daemon (or a whole simulated fleet in one process)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import re
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import gpufleet
from gpufleet.agent import identity
from gpufleet.agent.attribution import kubelet
from gpufleet.agent.attribution.refresh import Attribution
from gpufleet.agent.attribution.slurm import JobMappingDir, ProcEnvirons
from gpufleet.agent.node import Delivery, NodeAgent, NodeIdentity, Schedule, node_inventory
from gpufleet.agent.sources.base import GpuSource, SourceUnavailable
from gpufleet.agent.sources.faults import PRESETS, FaultModel
from gpufleet.agent.sources.models import MODELS
from gpufleet.agent.sources.scenario import REALISTIC, agent_players
from gpufleet.agent.sources.scheduler import KINDS, SimNode, SimScheduler
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import FAILBACK_AFTER_S
from gpufleet.plausible import drop_implausible
from gpufleet.security import SecuritySettingsError, add_client_security_flags, client_security
from gpufleet.settings import (
    Parser,
    add_flag,
    add_log_level,
    at_least,
    fail,
    host_ports,
    label_pair,
    labels_from_pairs,
    non_negative_int,
    positive_float,
    positive_int,
    setup_logging,
    warn_unknown_variables,
)
from gpufleet.signals import stop_on_signals
from gpufleet.wire import message_dict

log = logging.getLogger("gpufleet.agent")

DEFAULT_COLLECTOR = "127.0.0.1:50051"
# An extended resource name as Kubernetes has them (domain/name), optionally ending in * (a prefix).
RESOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*/[A-Za-z0-9][A-Za-z0-9._-]*\*?")
# How often the simulated scheduler's ground truth is checked for changes (--sim-truth-file).
TRUTH_EVERY_S = 1.0
# Simulated nodes per rack: a 40 kW rack holds about four 8-GPU H100 servers.
SIM_NODES_PER_RACK = 4


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpufleet-agent",
        description="Read GPUs through NVML (or simulated ones) and report to a gpufleet collector.",
    )
    add_flag(
        parser,
        "--collector",
        default=DEFAULT_COLLECTOR,
        type=host_ports,
        help="collector addresses HOST:PORT, comma-separated (a name counts as every address it resolves "
        "to); the order does not matter: each node ranks them by rendezvous hashing of its node id",
    )
    add_flag(
        parser,
        "--failback-after",
        type=positive_float,
        default=FAILBACK_AFTER_S,
        help="seconds on a collector other than the node's first-ranked before asking whether one ranked "
        "higher is back, and between asks (plus up to as much again, at random, to spread the fleet)",
    )
    add_flag(parser, "--source", default="nvml", choices=("nvml", "sim"), help="where GPU readings come from")
    add_flag(
        parser,
        "--once",
        action="store_true",
        help="print the node's inventory and one sample as JSON, then exit",
    )
    add_flag(parser, "--interval", type=positive_float, default=10.0, help="seconds between reports")
    add_flag(
        parser,
        "--process-interval",
        type=positive_float,
        default=30.0,
        help="seconds between process-list polls",
    )
    add_flag(parser, "--node-id", default="", help="stable node id (default: /etc/machine-id)")
    add_flag(parser, "--hostname", default="", help="node name shown to operators (default: the hostname)")
    add_flag(parser, "--datacenter", default="", help="topology: datacenter")
    add_flag(parser, "--cluster", default="", help="topology: cluster")
    add_flag(parser, "--rack", default="", help="topology: rack")
    add_flag(
        parser,
        "--label",
        action="append",
        type=label_pair,
        default=[],
        help="extra KEY=VALUE label (repeatable)",
    )
    add_flag(
        parser,
        "--max-buffered-reports",
        type=positive_int,
        default=360,
        help="reports kept while the collector is unreachable (oldest telemetry dropped first)",
    )
    add_flag(
        parser,
        "--spool-dir",
        default="",
        help="keep unacknowledged reports on disk here too, so an agent restart loses none",
    )
    add_flag(
        parser, "--keepalive", type=at_least(5), default=30.0, help="seconds between keepalive pings (min 5)"
    )
    add_client_security_flags(parser.add_argument_group("security (docs/security.md)"))
    add_flag(
        parser,
        "--inventory-interval",
        type=positive_float,
        default=300.0,
        help="seconds between inventory re-reads (GPU changes, driver upgrades)",
    )
    who = parser.add_argument_group("attribution: who holds each GPU (docs/attribution.md)")
    add_flag(
        who,
        "--kubelet-socket",
        default="auto",
        help="the kubelet's pod-resources socket; 'auto': "
        f"{kubelet.DEFAULT_SOCKET} for real GPUs, none for simulated ones; 'none': off",
    )
    add_flag(
        who,
        "--kubelet-resources",
        default=",".join(kubelet.DEFAULT_RESOURCES),
        type=resource_names,
        help="device plugin resources that are GPUs (comma-separated; a trailing * matches a prefix)",
    )
    add_flag(
        who,
        "--job-mapping-dir",
        default="",
        help="Slurm: a directory of per-GPU job files (dcgm-exporter's --hpc-job-mapping-dir convention)",
    )
    add_flag(
        who,
        "--no-process-attribution",
        action="store_true",
        help="do not read the GPU processes' owners and SLURM_* environment from /proc",
    )
    sim = parser.add_argument_group("simulation (--source sim)")
    add_flag(
        sim,
        "--nodes",
        type=positive_int,
        default=1,
        help="simulated nodes in this process, each with its own connection",
    )
    add_flag(sim, "--gpus-per-node", type=positive_int, default=8, help="GPUs per simulated node")
    add_flag(sim, "--model", default="H100", choices=sorted(MODELS), help="simulated GPU model")
    add_flag(sim, "--seed", type=int, default=0, help="simulation seed: the same seed gives the same fleet")
    add_flag(
        sim,
        "--clusters",
        type=positive_int,
        default=1,
        help="split the simulated nodes into this many clusters",
    )
    add_flag(
        sim,
        "--faults",
        default="none",
        choices=sorted((*PRESETS, REALISTIC)),
        help="fault rates: healthy (a large training run's), bad-cluster, none; realistic adds noise, "
        "precursors and weak signatures (docs/health-score.md)",
    )
    add_flag(
        sim,
        "--fault-rate-multiplier",
        type=at_least(0),
        default=1.0,
        help="compress time: multiply every fault rate by this",
    )
    add_flag(
        sim,
        "--node-offset",
        type=non_negative_int,
        default=0,
        help="index of the first simulated node (to run one fleet from several processes)",
    )
    add_flag(
        sim,
        "--scheduler",
        default="none",
        choices=("none", *KINDS),
        help="place simulated Kubernetes pods or Slurm jobs on the GPUs (mixed: alternate by cluster)",
    )
    add_flag(
        sim,
        "--mean-job-minutes",
        type=positive_float,
        default=120.0,
        help="mean lifetime of a simulated job",
    )
    add_flag(
        sim,
        "--sim-truth-file",
        default="",
        help="write the simulated scheduler's ground truth (who holds each GPU) here as JSON",
    )
    add_log_level(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {gpufleet.__version__}")
    return parser


def resource_names(value: str) -> list[str]:
    """Extended resource names (vendor-domain/name, a trailing * for a prefix), comma-separated."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    bad = [name for name in names if not RESOURCE_NAME.fullmatch(name)]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected resource names such as nvidia.com/gpu,nvidia.com/mig-*, got {value!r}"
        )
    return names


def host_attribution(args: argparse.Namespace) -> Attribution | None:
    """A real host's sources: the kubelet, a job-mapping directory, /proc."""
    socket = args.kubelet_socket
    if socket == "auto":
        socket = kubelet.DEFAULT_SOCKET if args.source == "nvml" else "none"
    pods = kubelet.KubeletPodLister(socket) if socket not in ("", "none") else None
    jobs = JobMappingDir(args.job_mapping_dir) if args.job_mapping_dir else None
    environs = None if args.no_process_attribution or args.source == "sim" else ProcEnvirons()
    attribution = Attribution(
        pods=pods,
        resources=args.kubelet_resources,
        job_mapping=jobs,
        environs=environs,
        pods_if_present=args.kubelet_socket == "auto",
    )
    return attribution if attribution.enabled else None


def sim_attribution(
    args: argparse.Namespace, scheduler: SimScheduler | None, hostname: str
) -> Attribution | None:
    """A simulated node's sources: the scheduler's stand-ins, unless real ones are given."""
    attribution = host_attribution(args)
    if attribution is not None or scheduler is None:
        return attribution
    job_mapping = scheduler.job_mapping(hostname)
    return Attribution(
        pods=scheduler.pod_lister(hostname),
        resources=args.kubelet_resources,
        job_mapping=job_mapping,
        # As deployed: on Kubernetes the kubelet names the pods; Slurm hosts read /proc too.
        environs=scheduler.environs(hostname) if job_mapping is not None else None,
    )


def sim_identity(args: argparse.Namespace, index: int, labels: dict[str, str]) -> NodeIdentity:
    """A distinct, stable identity for simulated node ``index``."""
    node_id = hashlib.sha256(f"gpufleet-sim:{args.seed}:{index}".encode()).hexdigest()[:32]
    if args.node_id and args.nodes == 1:
        node_id = args.node_id  # one simulated node may take a given identity (e.g. its certificate's)
    prefix = args.hostname or "sim-node"
    cluster = args.cluster or "sim"
    if args.clusters > 1:
        cluster = f"{cluster}-{index * args.clusters // max(args.nodes + args.node_offset, 1)}"
    return NodeIdentity(
        node_id=node_id,
        hostname=f"{prefix}-{index:05d}",
        boot_id=hashlib.sha256(f"boot:{node_id}".encode()).hexdigest()[:32],
        datacenter=args.datacenter or "sim-dc",
        cluster=cluster,
        rack=args.rack or f"rack-{index // SIM_NODES_PER_RACK:04d}",
        labels=labels,
    )


def host_identity(args: argparse.Namespace, labels: dict[str, str]) -> NodeIdentity:
    try:
        node_id = args.node_id or identity.machine_id()
    except RuntimeError as exc:
        fail(str(exc))
    return NodeIdentity(
        node_id=node_id,
        hostname=args.hostname or identity.hostname(),
        boot_id=identity.boot_id(),
        datacenter=args.datacenter,
        cluster=args.cluster,
        rack=args.rack,
        labels=labels,
    )


def open_source(args: argparse.Namespace, index: int) -> GpuSource:
    if args.source == "sim":
        preset = "none" if args.faults == REALISTIC else args.faults
        faults = FaultModel(preset, args.fault_rate_multiplier, seed=args.seed * 1_000_003 + index + 1)
        return SimulatedSource(
            args.model,
            args.gpus_per_node,
            seed=args.seed,
            node_index=index,
            interval_s=args.interval,
            faults=faults,
        )
    from gpufleet.agent.sources.nvml import NvmlSource

    return NvmlSource()


def play_scenario(args: argparse.Namespace, sources: list[GpuSource]) -> None:
    """--faults realistic: the simulated nodes of this process play one fleet scenario."""
    players = agent_players(
        len(sources),
        args.gpus_per_node,
        seed=args.seed,
        multiplier=args.fault_rate_multiplier,
        interval_s=args.interval,
        now_ns=time.time_ns(),
    )
    for source, player in zip(sources, players, strict=True):
        if isinstance(source, SimulatedSource):
            source.scenario = player


def print_once(source: GpuSource, node: NodeIdentity, attribution: Attribution | None = None) -> None:
    inventory = node_inventory(source, node)
    gpus = source.sample(with_processes=True)
    dropped = sum(drop_implausible(gpu) for gpu in gpus)
    once = {
        "inventory": message_dict(inventory),
        "gpus": [message_dict(gpu) for gpu in gpus],
        "invalid_values_dropped": dropped,
    }
    if attribution is not None:
        once["allocations"] = message_dict(asyncio.run(attribution.refresh(inventory, gpus)))
    print(json.dumps(once, indent=2))


def sim_scheduler(
    args: argparse.Namespace, nodes: Sequence[tuple[NodeIdentity, GpuSource]]
) -> SimScheduler | None:
    """The simulated scheduler that places pods or jobs on the simulated nodes (--scheduler)."""
    if args.scheduler == "none":
        return None
    if args.source != "sim":
        fail("--scheduler needs --source sim (a real host's GPUs are placed by its real scheduler)")
    sim_nodes = [SimNode(node.hostname, node.cluster, source) for node, source in nodes]  # type: ignore[arg-type]
    return SimScheduler(sim_nodes, args.scheduler, seed=args.seed, mean_job_s=args.mean_job_minutes * 60)


def raise_open_files_limit(connections: int) -> None:
    """Each simulated node holds a socket: make room for them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * 2 + 256
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open-files limit %d is low for %d connections: raise `ulimit -n`", new, connections)


async def run_node(agent: NodeAgent, stop: asyncio.Event) -> bool:
    """Run one node agent until ``stop``; False if it failed for good (the others carry on)."""
    try:
        await agent.run(stop)
    except Exception as exc:
        log.error("node agent %s failed for good: %s", agent.identity.hostname, exc, exc_info=exc)
        return False
    return True


async def write_truth(scheduler: SimScheduler, path: Path, stop: asyncio.Event) -> None:
    """Keep the simulated scheduler's ground truth in ``path``, rewritten when it changes."""
    written = -1
    while not stop.is_set():
        scheduler.tick()
        if scheduler.version != written:
            written = scheduler.version
            scheduler.write_truth(path)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=TRUTH_EVERY_S)


async def run_agents(agents: Sequence[NodeAgent], truth: tuple[SimScheduler, Path] | None = None) -> bool:
    """Run every node agent until a signal stops them; False when every one of them failed for good."""
    stop = asyncio.Event()
    stop_on_signals(stop, "stopping: flushing reports")
    tasks = [
        asyncio.create_task(run_node(agent, stop), name=f"node-{agent.identity.hostname}") for agent in agents
    ]
    writer = asyncio.create_task(write_truth(*truth, stop)) if truth else None
    results = await asyncio.gather(*tasks, return_exceptions=True)
    if writer is not None:
        await writer
    failed = [result for result in results if result is False]
    return len(failed) < len(agents)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    warn_unknown_variables(parser)
    try:
        labels = labels_from_pairs(args.label)
    except argparse.ArgumentTypeError as exc:
        fail(str(exc))
    collectors: list[str] = args.collector
    if args.nodes < 1 or (args.nodes > 1 and args.source != "sim"):
        fail("--nodes > 1 needs --source sim (a real host is one node)")
    try:
        count = 1 if args.once else args.nodes
        nodes = [
            (
                sim_identity(args, index, labels) if args.source == "sim" else host_identity(args, labels),
                open_source(args, index),
            )
            for index in range(args.node_offset, args.node_offset + count)
        ]
        if args.source == "sim" and args.faults == REALISTIC:
            play_scenario(args, [source for _, source in nodes])
        scheduler = sim_scheduler(args, nodes)
        if args.once:
            node, source = nodes[0]
            try:
                print_once(source, node, sim_attribution(args, scheduler, node.hostname))
            finally:
                source.close()
            return
        delivery = Delivery(
            max_buffered_reports=args.max_buffered_reports,
            spool_dir=Path(args.spool_dir) if args.spool_dir else None,
            keepalive_s=args.keepalive,
            security=client_security(args),
            failback_after_s=args.failback_after,
        )
        agents = []
        for position, (node, source) in enumerate(nodes):
            spread = min(args.interval, 5.0) * position / args.nodes if args.nodes > 1 else 0.0
            agents.append(
                NodeAgent(
                    source,
                    node,
                    collectors,
                    Schedule(
                        args.interval,
                        args.process_interval,
                        start_delay_s=spread,
                        inventory_interval_s=args.inventory_interval,
                    ),
                    blocking_source=args.source == "nvml",
                    delivery=delivery,
                    attribution=sim_attribution(args, scheduler, node.hostname),
                )
            )
    except (SourceUnavailable, SecuritySettingsError) as exc:
        fail(str(exc))
    raise_open_files_limit(len(agents))
    log.info("reporting %d node(s) to %s every %.1f s", len(agents), ",".join(collectors), args.interval)
    try:
        truth = (scheduler, Path(args.sim_truth_file)) if scheduler and args.sim_truth_file else None
        served = asyncio.run(run_agents(agents, truth))
    finally:
        close_sources(agents)
    if not served:
        # Exit non-zero so that the service manager (systemd's Restart=on-failure) starts it again.
        fail("every node agent failed for good (see the log above)", code=1)


def close_sources(agents: Sequence[NodeAgent]) -> None:
    for agent in agents:
        try:
            agent.source.close()
        except Exception as exc:
            log.warning("closing the source of %s failed: %s", agent.identity.hostname, exc)


if __name__ == "__main__":
    main()
