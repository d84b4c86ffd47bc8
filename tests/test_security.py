"""Mutual TLS, identity binding, scoped tokens and /metrics auth, over real connections."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import Uplink
from gpufleet.cli import certs
from gpufleet.collector.auth import BasicAuth, ServerSecurity, Tokens
from gpufleet.collector.ingest import IngestPolicy
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.security import ClientSecurity
from gpufleet.v1 import query_pb2, query_pb2_grpc
from tests.conftest import ROOT, http_get, local_config, metric
from tests.fleet import inventory_for

SECRETS = {
    "agent": "agent-secret-0123456789",
    "read": "read-secret-0123456789",
    "admin": "admin-secret-0123456789",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    node_id = inventory_for(SimulatedSource("H100", 8), 0).node_id
    certs.issue(
        directory,
        server_names=["localhost"],
        server_ips=["127.0.0.1"],
        agents=[node_id],
        clients=["operator"],
        days=1,
    )
    certs.issue(
        directory / "other", server_names=["localhost"], server_ips=[], agents=[node_id], clients=[], days=1
    )
    return directory


def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("".join(f"{scope} {scope}-holder {secret}\n" for scope, secret in SECRETS.items()))
    return path


async def start(security: ServerSecurity, bind: bool = False) -> Collector:
    collector = Collector(
        local_config(
            security=security,
            ingest=IngestPolicy(bind_node_id_to_certificate=bind),
        )
    )
    await collector.start()
    return collector


async def report_once(
    collector: Collector, security: ClientSecurity, node_index: int = 0, timeout: float = 5.0
) -> str:
    """Try to deliver one report; 'ok' or the error the uplink met."""
    source = SimulatedSource("H100", 8, node_index=node_index)
    inventory = inventory_for(source, node_index)
    uplink = Uplink(
        [f"localhost:{collector.grpc_port}"],
        inventory,
        security=security,
        backoff_base_s=0.05,
        backoff_cap_s=0.1,
        rng=random.Random(0),
    )
    uplink.submit(source.sample(with_processes=False))
    stop = asyncio.Event()
    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    logging.getLogger("gpufleet.agent.uplink").addHandler(handler)
    task = asyncio.create_task(uplink.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while uplink.last_acked_sequence < 1 and asyncio.get_running_loop().time() < deadline and not errors:
            await asyncio.sleep(0.02)
        return "ok" if uplink.last_acked_sequence == 1 else (errors[0] if errors else "timed out")
    finally:
        stop.set()
        await task
        logging.getLogger("gpufleet.agent.uplink").removeHandler(handler)


def client(pki: Path, name: str | None, ca: Path | None = None, token: str | None = None) -> ClientSecurity:
    return ClientSecurity(
        tls=True,
        ca=(ca or pki / "ca.pem").read_bytes(),
        cert=(pki / f"{name}.pem").read_bytes() if name else None,
        key=(pki / f"{name}.key").read_bytes() if name else None,
        token=token,
    )


@pytest.fixture
async def mtls(pki: Path) -> AsyncIterator[Collector]:
    collector = await start(
        ServerSecurity(tls_cert=pki / "server.pem", tls_key=pki / "server.key", client_ca=pki / "ca.pem"),
        bind=True,
    )
    yield collector
    await collector.stop()


async def test_mutual_tls_admits_only_agents_with_a_valid_certificate(pki: Path, mtls: Collector) -> None:
    node_id = inventory_for(SimulatedSource("H100", 8), 0).node_id
    assert await report_once(mtls, client(pki, f"agent-{node_id}")) == "ok"
    assert await report_once(mtls, client(pki, None)) != "ok"  # no client certificate
    foreign = pki / "other"
    assert await report_once(mtls, client(foreign, f"agent-{node_id}", ca=pki / "ca.pem")) != "ok"
    assert await report_once(mtls, ClientSecurity()) != "ok"  # plaintext to a TLS port
    assert len(mtls.state) == 1


async def test_an_agent_cannot_report_under_another_nodes_id(pki: Path, mtls: Collector) -> None:
    node_id = inventory_for(SimulatedSource("H100", 8), 0).node_id
    outcome = await report_once(mtls, client(pki, f"agent-{node_id}"), node_index=1)  # node 1, node 0's cert
    assert "PERMISSION_DENIED" in outcome and "identity of this client's certificate" in outcome
    assert metric(mtls, "gpufleet_collector_rejected_messages_total", reason="identity") >= 1
    assert len(mtls.state) == 0


@pytest.fixture
async def with_tokens(tmp_path: Path) -> AsyncIterator[Collector]:
    tokens = Tokens.from_file(tokens_file(tmp_path))
    basic = tmp_path / "basic"
    basic.write_text("prometheus:scrape-password\n")
    collector = await start(
        ServerSecurity(tokens=tokens, metrics_token=True, metrics_basic_auth=BasicAuth(basic))
    )
    yield collector
    await collector.stop()


async def test_tokens_are_scoped(with_tokens: Collector) -> None:
    assert "UNAUTHENTICATED" in await report_once(with_tokens, ClientSecurity())
    assert "UNAUTHENTICATED" in await report_once(with_tokens, ClientSecurity(token="not-a-token-at-all-x"))
    assert "PERMISSION_DENIED" in await report_once(with_tokens, ClientSecurity(token=SECRETS["read"]))
    assert await report_once(with_tokens, ClientSecurity(token=SECRETS["agent"])) == "ok"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{with_tokens.grpc_port}") as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        for secret, expected in (
            (SECRETS["agent"], grpc.StatusCode.PERMISSION_DENIED),
            (None, grpc.StatusCode.UNAUTHENTICATED),
        ):
            metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.GetFleetSummary(query_pb2.GetFleetSummaryRequest(), metadata=metadata)
            assert error.value.code() == expected
        for scope in ("read", "admin"):
            summary = await stub.GetFleetSummary(
                query_pb2.GetFleetSummaryRequest(), metadata=(("authorization", f"Bearer {SECRETS[scope]}"),)
            )
            assert summary.nodes == 1
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING  # load balancers need no token
    assert metric(with_tokens, "gpufleet_collector_denied_calls_total", scope="agent") >= 3


async def test_only_admin_tokens_change_state_and_the_cli_says_why(
    with_tokens: Collector, tmp_path: Path
) -> None:
    assert await report_once(with_tokens, ClientSecurity(token=SECRETS["agent"])) == "ok"
    await asyncio.sleep(0.2)  # the agent's stream closes

    async def cli(*args: str, token: str) -> tuple[int, str, str]:
        token_file = tmp_path / f"token-{token[:5]}"
        token_file.write_text(token)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpufleet.cli",
            *args,
            "--collector",
            f"127.0.0.1:{with_tokens.grpc_port}",
            "--token-file",
            str(token_file),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        return process.returncode or 0, out.decode(), err.decode()

    code, _, err = await cli("forget", "node-0000", token=SECRETS["read"])
    assert code == 1 and "may not" in err and "Traceback" not in err
    assert SECRETS["read"] not in err  # secrets are never echoed
    code, out, _ = await cli("nodes", token=SECRETS["read"])
    assert code == 0 and "node-0000" in out
    code, out, err = await cli("forget", "node-0000", token=SECRETS["admin"])
    assert code == 0, err
    assert len(with_tokens.state) == 0


async def test_metrics_need_a_read_token_or_basic_auth(with_tokens: Collector) -> None:
    url = f"http://127.0.0.1:{with_tokens.http_port}"

    async def get(path: str, authorization: str | None = None) -> int:
        headers = {"Authorization": authorization} if authorization else {}
        status, _, _ = await asyncio.to_thread(http_get, url + path, headers)
        return status

    assert await get("/metrics") == 401
    assert await get("/metrics/fleet", f"Bearer {SECRETS['agent']}") == 401
    assert await get("/metrics/fleet", f"Bearer {SECRETS['read']}") == 200
    good = base64.b64encode(b"prometheus:scrape-password").decode()
    bad = base64.b64encode(b"prometheus:guess").decode()
    assert await get("/metrics/nodes", f"Basic {good}") == 200
    assert await get("/metrics/nodes", f"Basic {bad}") == 401
    assert await get("/healthz") == 200 and await get("/readyz") == 200


async def test_an_open_collector_on_a_public_address_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gpufleet.collector.service")
    collector = Collector(
        CollectorConfig(
            grpc_host="0.0.0.0", grpc_port=0, http_host="127.0.0.1", http_port=0, shutdown_grace_s=0.1
        )
    )
    await collector.start()
    await collector.stop()
    warnings = [r for r in caplog.records if "without TLS or tokens" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].getMessage()


async def test_the_http_endpoints_speak_tls_with_the_same_certificate(pki: Path, mtls: Collector) -> None:
    url = f"https://localhost:{mtls.http_port}/healthz"
    status, body, _ = await asyncio.to_thread(http_get, url, None, 5.0, pki / "ca.pem")
    assert (status, body) == (200, b"ok\n")
