"""QueryService over real gRPC: summary, filters, sorting, paging past the 4 MiB limit."""

from __future__ import annotations

import grpc
import pytest

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.service import Collector
from gpufleet.v1 import query_pb2, query_pb2_grpc
from tests.fleet import add_node


@pytest.fixture
async def fleet(collector: Collector) -> Collector:
    for index in range(200):  # 1,600 GPUs, more than one page
        source = SimulatedSource("H100" if index < 150 else "A100", 8, seed=0, node_index=index)
        if index == 7:
            source.inject_xid(3, 79)
        add_node(collector.state, source, index, cluster=f"c{index % 2}")
    return collector


def stub(collector: Collector) -> query_pb2_grpc.QueryServiceStub:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
    return query_pb2_grpc.QueryServiceStub(channel)


async def all_gpus(collector: Collector, request: query_pb2.ListGpusRequest) -> list[query_pb2.GpuView]:
    gpus: list[query_pb2.GpuView] = []
    while True:
        page = await stub(collector).ListGpus(request)
        assert page.ByteSize() < 4 * 1024 * 1024
        gpus.extend(page.gpus)
        if not page.next_page_token:
            return gpus
        request.page_token = page.next_page_token


async def test_summary(fleet: Collector) -> None:
    summary = await stub(fleet).GetFleetSummary(query_pb2.GetFleetSummaryRequest())
    assert (summary.nodes, summary.gpus) == (200, 1600)
    models = {c.key: c.count for c in summary.gpus_by_model}
    assert models == {"NVIDIA H100 80GB HBM3": 1200, "NVIDIA A100-SXM4-80GB": 400}
    health = {c.key: c.count for c in summary.gpus_by_health}
    assert health == {"healthy": 1599, "unhealthy": 1}
    assert {c.key: c.count for c in summary.gpus_by_cluster} == {"c0": 800, "c1": 800}
    assert 0 < summary.mean_gpu_utilization_ratio < 1
    assert summary.power_draw_watts > 1600 * 50


async def test_paging_returns_every_gpu_once(fleet: Collector) -> None:
    gpus = await all_gpus(fleet, query_pb2.ListGpusRequest(page_size=300))
    assert len(gpus) == 1600
    assert len({g.inventory.uuid for g in gpus}) == 1600


async def test_filters_and_sorting(fleet: Collector) -> None:
    a100 = await all_gpus(fleet, query_pb2.ListGpusRequest(model="a100"))
    assert len(a100) == 400
    sick = await all_gpus(fleet, query_pb2.ListGpusRequest(health=query_pb2.GPU_HEALTH_UNHEALTHY))
    assert [(g.node_name, g.inventory.index) for g in sick] == [("node-0007", 3)]
    assert "XID 79" in sick[0].reasons[0] and sick[0].action == "reboot node"
    one_node = await all_gpus(fleet, query_pb2.ListGpusRequest(node="node-0042"))
    assert [g.inventory.index for g in one_node] == list(range(8))
    cluster = await all_gpus(fleet, query_pb2.ListGpusRequest(cluster="c1", model="H100"))
    assert len(cluster) == 600
    idle = await all_gpus(fleet, query_pb2.ListGpusRequest(idle_only=True))
    assert idle and all(g.sample.gpu_utilization_percent < 5 and g.idle for g in idle)
    hottest = await all_gpus(fleet, query_pb2.ListGpusRequest(sort_by="-temperature"))
    temperatures = [g.sample.gpu_temperature_celsius for g in hottest]
    assert temperatures == sorted(temperatures, reverse=True)


async def test_one_node_and_unknown_node(fleet: Collector) -> None:
    answer = await stub(fleet).GetNode(query_pb2.GetNodeRequest(node="node-0007"))
    assert answer.node.name == "node-0007" and len(answer.gpus) == 8
    assert len(answer.node.inventory.gpus) == 8
    by_id = await stub(fleet).GetNode(query_pb2.GetNodeRequest(node=answer.node.node_id))
    assert by_id.node.name == "node-0007"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub(fleet).GetNode(query_pb2.GetNodeRequest(node="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_arguments(fleet: Collector) -> None:
    for request in (query_pb2.ListGpusRequest(sort_by="colour"), query_pb2.ListGpusRequest(page_token="abc")):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub(fleet).ListGpus(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_nodes_list(fleet: Collector) -> None:
    page = await stub(fleet).ListNodes(query_pb2.ListNodesRequest(cluster="c0", page_size=50))
    assert page.total_size == 100 and len(page.nodes) == 50 and page.next_page_token
    assert not page.nodes[0].inventory.gpus  # the list is slim; GetNode has the GPUs
