"""The collector process: gRPC (ingest, query, health, reflection), HTTP, and housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpufleet import wire
from gpufleet.allocations import Prices
from gpufleet.collector.admin import AdminServicer
from gpufleet.collector.auth import AuthInterceptor, ServerSecurity
from gpufleet.collector.dcgm import DcgmExposition
from gpufleet.collector.eventlog import EventFollowers
from gpufleet.collector.exposition import CONTENT_TYPE, Exposition
from gpufleet.collector.fleetwide import FleetwideQueries
from gpufleet.collector.http import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_PEER,
    Handler,
    HttpServer,
    Request,
    Response,
)
from gpufleet.collector.ingest import SERVICE_NAME as INGEST_SERVICE
from gpufleet.collector.ingest import IngestPolicy, IngestServicer, handler
from gpufleet.collector.memory import LongLivedObjects
from gpufleet.collector.mqtt import MqttConfig, MqttPublisher
from gpufleet.collector.ownership import Ownership
from gpufleet.collector.peers import Peers
from gpufleet.collector.query import QueryServicer
from gpufleet.collector.recorder import EventBudget
from gpufleet.collector.selfmetrics import CollectorMetrics
from gpufleet.collector.state import FleetState, Liveness
from gpufleet.collector.store import Store
from gpufleet.collector.store_postgres import DatabaseRefused, PostgresStore
from gpufleet.collector.tier import DEFAULT_LEASE_S, CollectorIdInUse, Tier, event_id_base
from gpufleet.collector.webview import ASSETS as WEB_ASSETS
from gpufleet.collector.webview import FleetMap
from gpufleet.collector.workload import WorkloadLedger
from gpufleet.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2, query_pb2, query_pb2_grpc

log = logging.getLogger(__name__)

JSON = "application/json"
# The page loads nothing from anywhere else, and runs no script but its own.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name
# How often nodes are checked for silence, and rendered lines refreshed.
HOUSEKEEPING_INTERVAL_S = 1.0
MAX_SHARDS = 1024


@dataclass(frozen=True)
class CollectorConfig:
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_host: str = "0.0.0.0"
    http_port: int = 9490
    liveness: Liveness = field(default_factory=Liveness)
    shutdown_grace_s: float = 5.0
    # The SQLite database; None keeps everything in memory only.
    db_path: Path | None = None
    # A PostgreSQL URL: the fleet is kept there instead (db_path is then unused).
    db_url: str = ""
    ingest: IngestPolicy = field(default_factory=IngestPolicy)
    # Where events are published; None: no MQTT.
    mqtt: MqttConfig | None = None
    security: ServerSecurity = field(default_factory=ServerSecurity)
    # HTTP connections in all and from one address (idle ones make room for new ones).
    http_max_connections: int = MAX_CONNECTIONS
    http_max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    # Price per GPU-hour by model (part of its name), for what allocated and idle GPUs cost.
    prices: dict[str, float] = field(default_factory=dict)
    # This collector's name on its own metrics and in the tier ("": host:gRPC port, in a tier).
    collector_id: str = ""
    # In a tier: the gRPC address agents use for this collector ("": this host's and the port).
    advertise: str = ""
    # In a tier: how long a collector's membership (and its nodes' leases) lasts unrenewed.
    lease_s: float = DEFAULT_LEASE_S


class Collector:
    """Owns the fleet state and every server around it."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.metrics = CollectorMetrics()
        limits = config.ingest.limits
        self.state = FleetState(
            config.liveness,
            event_budget=EventBudget(limits.events_per_node_per_second, limits.event_burst_per_node),
            on_suppressed=self.metrics.events_suppressed.inc,
        )
        self.tier: Tier | None = None
        self.ownership: Ownership | None = None
        self.peers: Peers | None = None
        self.store: Store
        if config.db_url:
            # PostgreSQL: a member of a tier of collectors (of one, or of several).
            self.tier = tier = Tier(config.db_url, config.collector_id, config.advertise, config.lease_s)
            self.store = PostgresStore(config.db_url, self.state, self.metrics, tier)
            self.ownership = Ownership(tier, self.store, self.state)
            self.peers = Peers(tier, config.security.peer_credentials())
            self.state.events.id_floor = lambda: event_id_base(tier.number)
        else:
            self.store = Store(config.db_path, self.state, self.metrics)
        self.metrics.store_uncommitted_seconds.set_function(self.store.uncommitted_seconds)
        self.workloads = WorkloadLedger(self.state, Prices(config.prices))
        self.exposition = Exposition(self.state, lambda: self.workloads.render() + self.metrics.render())
        self.exposition.set_identity(config.collector_id)
        self.dcgm = DcgmExposition(self.state)
        self.followers = EventFollowers()
        self.fleet_map = FleetMap(self.state, self.exposition.totals)
        self.mqtt = MqttPublisher(config.mqtt, self.state, self.metrics, self.store) if config.mqtt else None
        # Every reader of the fleet's changes, in one place: told in this order, stopped in reverse.
        sinks = self.state.sinks
        sinks.on_error = lambda sink: self.metrics.sink_errors.labels(sink).inc()
        sinks_in_order = (
            self.store,
            self.exposition,
            self.workloads,
            self.dcgm,
            self.fleet_map,
            self.followers,
            self.mqtt,
        )
        for sink in sinks_in_order:
            if sink is not None:
                sinks.add(sink)
        self._grpc: grpc.aio.Server | None = None
        self._http = HttpServer(
            {
                "/": self._protected(self._page("index.html")),
                "/static/map.js": self._protected(self._page("map.js")),
                "/static/map.css": self._protected(self._page("map.css")),
                "/static/icon.svg": self._page("icon.svg"),
                "/favicon.ico": self._page("icon.svg"),
                "/api/fleet": self._protected(self._api_fleet),
                "/api/node": self._protected(self._api_node),
                "/api/search": self._protected(self._api_search),
                "/api/stream": self._protected(self._api_stream),
                "/endpoints": self._index,
                "/metrics": self._protected(self._metrics_all),
                "/metrics/fleet": self._protected(self._metrics_fleet),
                "/metrics/nodes": self._protected(self._metrics_nodes),
                "/metrics/dcgm": self._protected(self._metrics_dcgm),
                "/healthz": self._healthz,
                "/readyz": self._readyz,
            },
            max_connections=config.http_max_connections,
            max_connections_per_peer=config.http_max_connections_per_peer,
            on_refused=lambda reason: self.metrics.http_refused.labels(reason).inc(),
        )
        self._health = health.aio.HealthServicer()
        self._ready = False
        self.memory = LongLivedObjects(self.metrics.gc_pause_seconds)
        self._housekeeping: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._fenced_said = False
        self.grpc_port = config.grpc_port
        self.http_port = config.http_port

    async def start(self) -> None:
        await self.store.open_async()
        security = self.config.security
        interceptors = []
        if security.tokens is not None:
            interceptors.append(
                AuthInterceptor(security.tokens, lambda scope: self.metrics.denied.labels(scope).inc())
            )
        server = grpc.aio.server(options=wire.SERVER_OPTIONS, interceptors=interceptors)
        ingest = IngestServicer(
            self.state,
            self.metrics,
            durable=self.store.durable,
            policy=self.config.ingest,
            ownership=self.ownership,
        )
        server.add_generic_rpc_handlers((handler(ingest),))
        queries = (
            QueryServicer(self.state, self.exposition.totals, self.followers, self.workloads)
            if self.peers is None
            else FleetwideQueries(
                self.state, self.exposition.totals, self.followers, self.workloads, self.peers
            )
        )
        query_pb2_grpc.add_QueryServiceServicer_to_server(queries, server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
                QUERY_SERVICE,
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.config.grpc_host}:{self.config.grpc_port}"
        credentials = security.grpc_credentials()
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address}: is the port in use?") from exc
        await self._join_tier()
        self.memory.settle()
        self.state.sinks.start()
        await server.start()
        self._grpc = server
        self.http_port = await self._http.start(
            self.config.http_host, self.config.http_port, security.http_ssl_context()
        )
        for service in ("", INGEST_SERVICE, QUERY_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._housekeeping = asyncio.create_task(self._housekeep(), name="collector-housekeeping")
        self._ready = True
        self._warn_if_open()
        log.info(
            "collector listening: gRPC %s:%d, HTTP http://%s:%d/metrics",
            self.config.grpc_host,
            self.grpc_port,
            self.config.http_host,
            self.http_port,
        )

    async def _join_tier(self) -> None:
        """In a tier: become a member (named for the port just bound), serve the orphans, renew."""
        tier = self.tier
        if tier is None or self.ownership is None:
            return
        host = socket.gethostname()
        tier.collector_id = tier.collector_id or f"{host}:{self.grpc_port}"
        tier.address = tier.address or f"{_advertised_host(self.config.grpc_host)}:{self.grpc_port}"
        try:
            await asyncio.to_thread(tier.open)
        except CollectorIdInUse as exc:
            raise DatabaseRefused(str(exc)) from None
        except (psycopg.Error, OSError) as exc:
            raise DatabaseRefused(f"cannot join the tier in {self.store.describe()}: {exc}") from None
        self.exposition.set_identity(tier.collector_id)
        if self.mqtt is not None:
            self.mqtt.collector_id = tier.collector_id
        self.metrics.tier_nodes.set_function(lambda: len(tier))
        self.metrics.tier_members.set_function(lambda: len(tier.live_members()))
        self.metrics.tier_fenced.set_function(lambda: int(tier.fenced))
        await self.ownership.adopt_orphans()
        tier.start(self._peer_events)
        log.info(
            "collector %s is a member of the tier (%d others live), serving %d nodes",
            tier.collector_id,
            len(tier.peers),
            len(self.state),
        )

    def _peer_events(self, ids: list[int]) -> None:
        """Events another collector of the tier committed: for this one's followers (only)."""
        if len(self.followers) and self.tier is not None and isinstance(self.store, PostgresStore):
            task = asyncio.create_task(self._tell_followers(ids))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _tell_followers(self, ids: list[int]) -> None:
        assert self.tier is not None and isinstance(self.store, PostgresStore)
        try:
            events = await asyncio.to_thread(self.tier.load, self.store.read_events, ids)
        except (psycopg.Error, OSError) as exc:
            log.warning("cannot read %d events of other collectors for followers: %s", len(ids), exc)
            return
        for event in events:
            self.followers.event(event)

    def _warn_if_open(self) -> None:
        """One clear warning when anyone on the network could report as any node or read the fleet."""
        security = self.config.security
        if security.tls or security.tokens is not None:
            return
        exposed = [
            address for address in (self.config.grpc_host, self.config.http_host) if not _is_loopback(address)
        ]
        if exposed:
            log.warning(
                "listening on %s without TLS or tokens: anyone who can reach these ports can report as any "
                "node and read the whole fleet; see docs/security.md (--tls-cert, --tokens-file)",
                " and ".join(sorted(set(exposed))),
            )

    async def stop(self) -> None:
        """Stop accepting, let streams finish within the grace period, then close."""
        self._ready = False
        await self._health.enter_graceful_shutdown()
        await self.fleet_map.stop(0)  # open pages' streams end: they would hold the HTTP server
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self._grpc is not None:
            await self._grpc.stop(self.config.shutdown_grace_s)
        await self._http.stop()
        await self.state.sinks.stop(self.config.shutdown_grace_s)
        if self.peers is not None:
            await self.peers.close()
        if self.tier is not None:
            await self.tier.stop()  # what it held is written: the others may take it at once
        self.memory.close()

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                self.state.sweep()
                self.exposition.refresh()
                self.memory.settle()
                await self._tell_health()
            except Exception:
                log.exception("housekeeping failed; retrying in %.0f s", HOUSEKEEPING_INTERVAL_S)

    # -- HTTP ------------------------------------------------------------------------

    def _protected(self, handler: Handler) -> Handler:
        """``handler`` behind the /metrics authentication, if any is configured."""

        async def guarded(request: Request) -> Response:
            if not self.config.security.http_allows(request.headers.get("authorization")):
                return Response(
                    401,
                    b"authentication required\n",
                    headers={"WWW-Authenticate": 'Bearer realm="gpufleet", Basic realm="gpufleet"'},
                )
            return await handler(request)

        return guarded

    async def _metrics_all(self, request: Request) -> Response:
        if "shard" in request.query or "shards" in request.query:
            return await self._metrics_nodes(request)
        started = time.perf_counter()
        body = self.exposition.everything()
        self.metrics.scrape_render_seconds.set(time.perf_counter() - started)
        return Response(body=body, content_type=CONTENT_TYPE)

    async def _metrics_fleet(self, request: Request) -> Response:
        return Response(body=self.exposition.fleet(), content_type=CONTENT_TYPE)

    async def _metrics_nodes(self, request: Request) -> Response:
        shard, shards = _shard_params(request)
        return Response(body=self.exposition.nodes(shard, shards), content_type=CONTENT_TYPE)

    async def _metrics_dcgm(self, request: Request) -> Response:
        """dcgm-exporter compatible names and labels, for its dashboards and alerts."""
        shard, shards = _shard_params(request)
        return Response(body=self.dcgm.body(shard, shards), content_type=CONTENT_TYPE)

    async def _tell_health(self) -> None:
        """A fenced member of a tier is not ready and its ingest NOT_SERVING: agents that ask
        whether to move back to it (their failback check) stay where they are."""
        fenced = self.tier is not None and self.tier.fenced
        if fenced != self._fenced_said:
            self._fenced_said = fenced
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if fenced
                else health_pb2.HealthCheckResponse.SERVING
            )
            for service in ("", INGEST_SERVICE):
                await self._health.set(service, status)

    # -- the fleet map (collector/webview.py, collector/web/) ---------------------------------

    def _page(self, name: str) -> Handler:
        kinds = {
            ".html": "text/html; charset=utf-8",
            ".js": "text/javascript; charset=utf-8",
            ".css": "text/css",
            ".svg": "image/svg+xml",
        }
        body = (WEB_ASSETS / name).read_bytes()
        content_type = kinds[Path(name).suffix]

        async def page(request: Request) -> Response:
            return Response(body=body, content_type=content_type, headers=dict(PAGE_HEADERS))

        return page

    async def _api_fleet(self, request: Request) -> Response:
        return Response(body=self.fleet_map.fleet(), content_type=JSON, headers={"Cache-Control": "no-store"})

    async def _api_node(self, request: Request) -> Response:
        key = request.query.get("id", [""])[0]
        node = self.fleet_map.node(key)
        if node is None:
            return Response(404, f"no node named or with id {key!r}\n".encode())
        return Response(
            body=json.dumps(node).encode(), content_type=JSON, headers={"Cache-Control": "no-store"}
        )

    async def _api_search(self, request: Request) -> Response:
        found = self.fleet_map.search(request.query.get("q", [""])[0])
        return Response(
            body=json.dumps(found).encode(), content_type=JSON, headers={"Cache-Control": "no-store"}
        )

    async def _api_stream(self, request: Request) -> Response:
        return Response(content_type="text/event-stream", stream=self.fleet_map.follow())

    async def _healthz(self, request: Request) -> Response:
        return Response(body=b"ok\n")

    async def _readyz(self, request: Request) -> Response:
        if not self._ready:
            return Response(503, b"not ready\n")
        if self.tier is not None and self.tier.fenced:
            return Response(503, b"not ready: cannot renew this collector's membership of the tier\n")
        if self.store.stalled():
            waited = self.store.uncommitted_seconds()
            return Response(503, f"not ready: the database writer is stalled ({waited:.0f} s)\n".encode())
        return Response(body=b"ready\n")

    async def _index(self, request: Request) -> Response:
        return Response(
            body=(
                b"gpufleet collector\n\n"
                b"/metrics                      everything (fleet aggregates, every node and GPU)\n"
                b"/metrics/fleet                fleet aggregates and the collector's own metrics\n"
                b"/metrics/nodes?shard=I&shards=N  per-node and per-GPU series, one shard of N\n"
                b"/metrics/dcgm                 dcgm-exporter compatible names and labels\n"
                b"/healthz /readyz\n"
            )
        )


def _shard_params(request: Request) -> tuple[int, int]:
    try:
        shard = int(request.query.get("shard", ["0"])[0])
        shards = int(request.query.get("shards", ["1"])[0])
    except ValueError:
        raise ValueError("shard and shards must be integers") from None
    if not 1 <= shards <= MAX_SHARDS or not 0 <= shard < shards:
        raise ValueError(f"need 0 <= shard < shards <= {MAX_SHARDS}")
    return shard, shards


def _advertised_host(listen_host: str) -> str:
    """The host part agents dial: the listen address, or this host's own for a wildcard."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
