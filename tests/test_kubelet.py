"""Kubernetes attribution: pod-resources answers mapped onto GPUs, and a kubelet that fails every way."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.agent.attribution.base import AttributionFailed, Targets
from gpufleet.agent.attribution.kubelet import (
    DEFAULT_RESOURCES,
    KubeletPodLister,
    allocations_from_pods,
    wanted,
)
from gpufleet.allocations import MAX_VALUE_CHARS, TRUNCATED_MARK, bound
from gpufleet.kubelet.podresources.v1 import api_pb2
from gpufleet.v1 import allocation_pb2, inventory_pb2
from tests.conftest import ROOT
from tests.fake_kubelet import garbage_server, pod, running_kubelet

GPU = "nvidia.com/gpu"
NOBODY = 65534  # the user called nobody


def inventory(gpus: int = 4) -> inventory_pb2.NodeInventory:
    """GPUs GPU-0000... upwards; GPU 1 is split into two MIG instances (GPU instances 1 and 2)."""
    node = inventory_pb2.NodeInventory(
        gpus=[inventory_pb2.GpuInventory(index=i, uuid=f"GPU-{i:04d}") for i in range(gpus)]
    )
    node.gpus[1].mig_instances.extend(
        [
            inventory_pb2.MigInventory(
                index=0, uuid="MIG-aaaa", gpu_instance_id=1, compute_instance_id=0, profile="3g.40gb"
            ),
            inventory_pb2.MigInventory(
                index=1, uuid="MIG-bbbb", gpu_instance_id=2, compute_instance_id=0, profile="1g.10gb"
            ),
        ]
    )
    return node


TARGETS = Targets(inventory())


def held(allocations: list[allocation_pb2.Allocation]) -> list[tuple[int, int | None, str, str, str]]:
    """Each allocation as (gpu, gpu instance or None, namespace, pod, container)."""
    return [
        (
            a.gpu_index,
            a.gpu_instance_id if a.HasField("gpu_instance_id") else None,
            a.namespace,
            a.pod,
            a.container,
        )
        for a in allocations
    ]


def listing(*pods: api_pb2.PodResources) -> api_pb2.ListPodResourcesResponse:
    return api_pb2.ListPodResourcesResponse(pod_resources=pods)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for sockets (a unix socket's path is at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    yield path
    for folder, subfolders, _ in os.walk(path):  # a test may have closed some to everyone
        for name in subfolders:
            os.chmod(os.path.join(folder, name), 0o700)
    shutil.rmtree(path)


# --- Mapping ------------------------------------------------------------------------------------


def test_ids_of_every_kind_name_their_gpu_or_mig_instance() -> None:
    response = listing(
        pod("ml", "by-uuid", {"main": [(GPU, ["GPU-0003"])]}),
        pod("ml", "by-index", {"main": [(GPU, ["2"])]}),
        pod("ml", "by-mig-uuid", {"main": [("nvidia.com/mig-1g.10gb", ["MIG-bbbb"])]}),
        pod("ml", "by-mig-index", {"main": [("nvidia.com/mig-3g.40gb", ["1:0"])]}),
        pod("ml", "time-sliced", {"a": [(GPU, ["GPU-0000::0"])], "b": [(GPU, ["GPU-0000::1"])]}),
    )
    allocations, unknown = allocations_from_pods(response, TARGETS)
    assert unknown == 0
    assert held(allocations) == [
        (0, None, "ml", "time-sliced", "a"),
        (0, None, "ml", "time-sliced", "b"),
        (1, 1, "ml", "by-mig-index", "main"),
        (1, 2, "ml", "by-mig-uuid", "main"),
        (2, None, "ml", "by-index", "main"),
        (3, None, "ml", "by-uuid", "main"),
    ]
    assert {a.source for a in allocations} == {"kubernetes"}


def test_unknown_ids_are_counted_and_the_rest_still_map() -> None:
    response = listing(pod("ml", "p", {"main": [(GPU, ["GPU-0000", "GPU-gone", "9", "1:5", " "])]}))
    allocations, unknown = allocations_from_pods(response, TARGETS)
    assert held(allocations) == [(0, None, "ml", "p", "main")]
    assert unknown == 4


def test_a_device_listed_twice_for_one_container_gives_one_allocation() -> None:
    response = listing(
        pod(
            "ml",
            "p",
            {"main": [(GPU, ["GPU-0002", "2", "GPU-0002::1"]), (GPU, ["GPU-0002"])], "side": [(GPU, ["2"])]},
        )
    )
    allocations, _ = allocations_from_pods(response, TARGETS)
    assert held(allocations) == [(2, None, "ml", "p", "main"), (2, None, "ml", "p", "side")]


def test_only_gpu_resources_count_and_the_names_can_be_chosen() -> None:
    response = listing(
        pod(
            "ml",
            "p",
            {
                "main": [
                    (GPU, ["GPU-0000"]),
                    ("nvidia.com/mig-1g.10gb", ["MIG-bbbb"]),
                    ("example.com/accelerator", ["GPU-0003"]),
                    ("nvidia.com/gpu.shared", ["GPU-0002"]),
                ]
            },
        )
    )
    assert held(allocations_from_pods(response, TARGETS)[0]) == [
        (0, None, "ml", "p", "main"),
        (1, 2, "ml", "p", "main"),
    ]
    whole_gpus_only = allocations_from_pods(response, TARGETS, ["nvidia.com/gpu"])[0]
    assert held(whole_gpus_only) == [(0, None, "ml", "p", "main")]
    custom = allocations_from_pods(response, TARGETS, ["example.com/*", "nvidia.com/gpu.shared"])[0]
    assert held(custom) == [(2, None, "ml", "p", "main"), (3, None, "ml", "p", "main")]


def test_resource_names_are_exact_unless_they_end_in_a_star() -> None:
    assert DEFAULT_RESOURCES == ("nvidia.com/gpu", "nvidia.com/mig-*")
    assert wanted("nvidia.com/gpu", DEFAULT_RESOURCES)
    assert wanted("nvidia.com/mig-7g.80gb", DEFAULT_RESOURCES)
    assert not wanted("nvidia.com/gpu.shared", DEFAULT_RESOURCES)
    assert not wanted("nvidia.com/mig", DEFAULT_RESOURCES)
    assert not wanted("amd.com/gpu", DEFAULT_RESOURCES)
    assert not wanted("nvidia.com/gpu", [])


# --- Through a kubelet on a real socket ---------------------------------------------------------


async def test_pods_that_come_and_go_between_lists_are_seen(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    lister = KubeletPodLister(str(path))
    async with running_kubelet(path) as kubelet:
        kubelet.add(pod("ml", "train-0", {"main": [(GPU, ["GPU-0000", "GPU-0001"])]}))
        first, _ = allocations_from_pods(await lister.list(), TARGETS)
        assert held(first) == [(0, None, "ml", "train-0", "main"), (1, None, "ml", "train-0", "main")]

        kubelet.remove("ml", "train-0")
        kubelet.add(pod("web", "infer-7", {"server": [("nvidia.com/mig-1g.10gb", ["MIG-bbbb"])]}))
        second, _ = allocations_from_pods(await lister.list(), TARGETS)
        assert held(second) == [(1, 2, "web", "infer-7", "server")]

        kubelet.remove("web", "infer-7")
        assert allocations_from_pods(await lister.list(), TARGETS) == ([], 0)
        assert kubelet.list_calls == 3
    await lister.close()


async def test_five_hundred_pods_on_one_node(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    targets = Targets(inventory(gpus=8))
    lister = KubeletPodLister(str(path))
    async with running_kubelet(path) as kubelet:
        for i in range(500):
            devices = [(GPU, [f"GPU-{i % 8:04d}::{i}"])] if i % 2 == 0 else [("cpu", [])]
            kubelet.add(pod(f"team-{i % 10}", f"worker-{i:03d}", {"main": devices, "sidecar": []}))
        started = time.monotonic()
        response = await lister.list()
        allocations, unknown = allocations_from_pods(response, targets)
        elapsed = time.monotonic() - started
    await lister.close()
    assert len(response.pod_resources) == 500
    assert len(allocations) == 250 and unknown == 0
    assert [a.gpu_index for a in allocations] == sorted(a.gpu_index for a in allocations)
    assert elapsed < 1.5


async def test_a_ten_kilobyte_pod_name_is_kept_and_bound_cuts_it(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    name = "p" * 10_240
    lister = KubeletPodLister(str(path))
    async with running_kubelet(path) as kubelet:
        kubelet.add(pod("ml", name, {"main": [(GPU, ["GPU-0000"])]}))
        allocations, _ = allocations_from_pods(await lister.list(), TARGETS)
    await lister.close()
    assert [a.pod for a in allocations] == [name]  # mapping keeps what the kubelet said ...
    message = allocation_pb2.Allocations(allocations=allocations)
    assert bound(message) == 1  # ... the shared limits cut it, and count the cut
    cut = message.allocations[0].pod
    assert len(cut) == MAX_VALUE_CHARS and cut.endswith(TRUNCATED_MARK) and cut.startswith("ppp")


async def test_allocatable_devices_and_a_kubelet_too_old_to_list_them(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    lister = KubeletPodLister(str(path))
    async with running_kubelet(path) as kubelet:
        kubelet.allocatable = [
            api_pb2.ContainerDevices(resource_name=GPU, device_ids=["GPU-0000", "GPU-0001"])
        ]
        answer = await lister.allocatable()
        assert [list(d.device_ids) for d in answer.devices] == [["GPU-0000", "GPU-0001"]]

        kubelet.serves_allocatable = False
        with pytest.raises(AttributionFailed, match=r"does not serve .*GetAllocatableResources.*1\.23"):
            await lister.allocatable()
        assert len((await lister.list()).pod_resources) == 0  # List still works
    await lister.close()


async def test_an_answer_over_the_size_cap_fails(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    lister = KubeletPodLister(str(path), max_response_bytes=4096)
    async with running_kubelet(path) as kubelet:
        for i in range(100):
            kubelet.add(pod("ml", f"worker-{i:03d}", {"main": [(GPU, ["GPU-0000"])]}))
        with pytest.raises(AttributionFailed, match="larger than 4096 bytes"):
            await lister.list()
    await lister.close()


# --- Failures -----------------------------------------------------------------------------------


def one_line(failure: pytest.ExceptionInfo[AttributionFailed]) -> str:
    message = str(failure.value)
    assert "\n" not in message and "Traceback" not in message and len(message) < 400
    return message


async def test_a_hanging_kubelet_fails_within_the_deadline(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    lister = KubeletPodLister(str(path), deadline_s=0.3)
    async with running_kubelet(path) as kubelet:
        kubelet.hang = True
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(AttributionFailed) as failure:
                await asyncio.wait_for(lister.list(), timeout=5)
            assert time.monotonic() - started < 1.5
            assert one_line(failure) == f"kubelet at {path} did not answer List within 0.3 s"
        kubelet.hang = False
        assert len((await lister.list()).pod_resources) == 0
    await lister.close()


async def test_garbage_on_the_socket_fails_with_a_message(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    lister = KubeletPodLister(str(path), deadline_s=1.0)
    async with garbage_server(path):
        started = time.monotonic()
        with pytest.raises(AttributionFailed) as failure:
            await asyncio.wait_for(lister.list(), timeout=5)
        assert time.monotonic() - started < 2.0
    await lister.close()
    message = one_line(failure)
    assert message.startswith(f"kubelet at {path} ")
    assert "not answering gRPC" in message or "did not answer" in message


async def test_no_socket_says_how_to_mount_it(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    with pytest.raises(AttributionFailed) as failure:
        await KubeletPodLister(str(path)).list()
    assert one_line(failure) == (
        f"no kubelet socket at {path}: mount /var/lib/kubelet/pod-resources into the agent "
        "(see deploy/kubernetes/agent.yaml) or pass --kubelet-socket"
    )


async def test_a_file_that_is_not_a_socket_is_named(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    path.write_text("not a socket")
    with pytest.raises(AttributionFailed, match="is not a socket"):
        await KubeletPodLister(str(path)).list()


# Tests run as root, where permissions never refuse. The child loads what it needs as root (the
# interpreter may live where only root can read), then drops to nobody and lists each socket.
_LIST_AS_NOBODY = f"""
import asyncio, os, sys
from gpufleet.agent.attribution.base import AttributionFailed
from gpufleet.agent.attribution.kubelet import KubeletPodLister

if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid({NOBODY})
        os.setuid({NOBODY})
    except PermissionError as exc:
        sys.exit(f"cannot drop to uid {NOBODY}: {{exc}}")

async def main():
    for path in sys.argv[1:]:
        lister = KubeletPodLister(path)
        try:
            print("listed", len((await lister.list()).pod_resources))
        except AttributionFailed as exc:
            print(exc)
        await lister.close()

asyncio.run(main())
"""


def list_as_nobody(*paths: Path) -> list[str]:
    """What an agent that is not root gets from list() for each socket (skips if none can be had)."""
    done = subprocess.run(
        [sys.executable, "-c", _LIST_AS_NOBODY, *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0 and done.stderr.startswith("cannot drop to uid"):
        pytest.skip(f"permissions cannot be tested here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


async def test_a_socket_without_permission_says_so(socket_dir: Path) -> None:
    os.chmod(socket_dir, 0o755)
    open_dir, closed_dir, closed_socket_dir = (socket_dir / name for name in ("open", "closed", "socket"))
    for place in (open_dir, closed_dir, closed_socket_dir):
        place.mkdir(mode=0o755)
    async with (
        running_kubelet(open_dir / "kubelet.sock") as kubelet,
        running_kubelet(closed_dir / "kubelet.sock"),
        running_kubelet(closed_socket_dir / "kubelet.sock"),
    ):
        kubelet.add(pod("ml", "p", {"main": [(GPU, ["GPU-0000"])]}))
        os.chmod(open_dir / "kubelet.sock", 0o777)
        os.chmod(closed_dir, 0o000)
        os.chmod(closed_socket_dir / "kubelet.sock", 0o000)
        lines = await asyncio.to_thread(
            list_as_nobody,
            open_dir / "kubelet.sock",
            closed_dir / "kubelet.sock",
            closed_socket_dir / "kubelet.sock",
        )
    assert lines[0] == "listed 1"  # the same user may list where permissions allow it
    assert lines[1] == (
        f"cannot reach the kubelet socket at {closed_dir / 'kubelet.sock'}: permission denied on its "
        "directory; run the agent as root (the kubelet's socket is root's only)"
    )
    assert lines[2] == (
        f"cannot connect to the kubelet socket at {closed_socket_dir / 'kubelet.sock'}: permission denied; "
        "run the agent as root (the kubelet's socket is root's only)"
    )


async def test_a_socket_nobody_listens_on_is_named(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"  # a kubelet that died left its socket behind
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(AttributionFailed) as failure:
        await KubeletPodLister(str(path)).list()
    assert one_line(failure) == (
        f"kubelet at {path} is not answering gRPC (connect failed: Connection refused): "
        "is the kubelet running, and is this its pod-resources socket?"
    )


async def test_a_restarted_kubelet_is_found_again(socket_dir: Path) -> None:
    path = socket_dir / "kubelet.sock"
    lister = KubeletPodLister(str(path), deadline_s=1.0)
    async with running_kubelet(path) as kubelet:
        kubelet.add(pod("ml", "p", {"main": [(GPU, ["GPU-0000"])]}))
        assert len((await lister.list()).pod_resources) == 1

        await kubelet.stop()  # the kubelet restarts; the agent asks while it is away
        with pytest.raises(AttributionFailed) as failure:
            await lister.list()
        assert str(path) in one_line(failure)
        await kubelet.start()
        assert len((await lister.list()).pod_resources) == 1

        await kubelet.stop()  # and again, this time back before the agent asks
        await kubelet.start()
        assert len((await lister.list()).pod_resources) == 1
    await lister.close()
