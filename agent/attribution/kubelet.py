"""Kubernetes attribution: which pod's container holds each GPU, from the kubelet's pod-resources API.

The kubelet serves ``v1.PodResourcesLister`` on a unix socket that only root can reach; the agent's
DaemonSet mounts its directory. What the device plugin handed each container (GPU or MIG UUIDs,
or indices) is mapped onto this node's inventory by :class:`Targets`, the same way for every source.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from gpufleet.agent.attribution.base import AttributionFailed, Targets
from gpufleet.kubelet.podresources.v1 import api_pb2, api_pb2_grpc
from gpufleet.v1 import allocation_pb2

SOURCE = "kubernetes"
DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# Resource names whose devices are GPUs. An entry ending in "*" is a prefix: the NVIDIA device
# plugin's MIG "mixed" strategy names one resource per profile (nvidia.com/mig-1g.10gb, ...).
DEFAULT_RESOURCES = ("nvidia.com/gpu", "nvidia.com/mig-*")
# The kubelet answers from memory in milliseconds; a kubelet that does not is hung, not slow.
DEFAULT_DEADLINE_S = 2.0
# 500 pods with a few containers each come to well under 1 MiB; more than this is not a kubelet.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# The NVIDIA device plugin names a time-sliced GPU's replicas "<GPU id>::<replica>".
REPLICA_SEPARATOR = "::"
# A gRPC error's details can run long; their gist has to fit on one line of a log.
_MAX_DETAILS_CHARS = 160


def wanted(resource_name: str, resources: Sequence[str]) -> bool:
    """Whether a resource's devices are GPUs: an exact name, or a prefix given as "name*"."""
    for entry in resources:
        if entry.endswith("*"):
            if resource_name.startswith(entry[:-1]):
                return True
        elif resource_name == entry:
            return True
    return False


def unwatched_gpu_resources(
    allocatable: api_pb2.AllocatableResourcesResponse, targets: Targets, resources: Sequence[str]
) -> list[str]:
    """Resource names under which the kubelet hands out this node's GPUs but that are not watched.

    The most common reason for pods missing from GPU metrics: a device plugin configured with
    another name (time-slicing's ``nvidia.com/gpu.shared``, a renamed MIG strategy).
    """
    names = set()
    for devices in allocatable.devices:
        if wanted(devices.resource_name, resources):
            continue
        if any(targets.find(device_id.split(REPLICA_SEPARATOR, 1)[0]) for device_id in devices.device_ids):
            names.add(devices.resource_name)
    return sorted(names)


def allocations_from_pods(
    response: api_pb2.ListPodResourcesResponse,
    targets: Targets,
    resources: Sequence[str] = DEFAULT_RESOURCES,
) -> tuple[list[allocation_pb2.Allocation], int]:
    """Every (GPU or MIG instance, container) pair the kubelet lists, and how many ids named none.

    An id this node's inventory does not know (a GPU that NVML lost, another plugin's devices under
    a matching name) is counted, not an error: the rest still map. One allocation per pair however
    often the id is listed (time-sliced replicas, a plugin listing twice), in a stable order so
    that an unchanged node sends unchanged allocations.
    """
    found: dict[tuple[int, int, str, str, str], allocation_pb2.Allocation] = {}
    unknown = 0
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if not wanted(devices.resource_name, resources):
                    continue
                for device_id in devices.device_ids:
                    target = targets.find(device_id.partition(REPLICA_SEPARATOR)[0])
                    if target is None:
                        unknown += 1
                        continue
                    instance = -1 if target.gpu_instance_id is None else target.gpu_instance_id
                    key = (target.gpu_index, instance, pod.namespace, pod.name, container.name)
                    if key not in found:
                        found[key] = target.allocation(
                            SOURCE, namespace=pod.namespace, pod=pod.name, container=container.name
                        )
    return [found[key] for key in sorted(found)], unknown


def _gist(details: str | None, target: str) -> str:
    """What a gRPC error's details come to, without the target and prefixes they repeat."""
    text = " ".join((details or "").split()).rpartition("last error: ")[2]
    text = re.sub(r"^[A-Z_]+: ", "", text).replace(f"{target}: ", "")
    if text.startswith("connect failed") and " error: " in text:
        text = "connect failed: " + text.rpartition(" error: ")[2]
    return text[:_MAX_DETAILS_CHARS] or "no details"


class KubeletPodLister:
    """The kubelet's pod-resources API (the PodLister seam): one channel, opened when first needed.

    Every failure is an :class:`AttributionFailed` whose message says what to do. After one, the
    channel is dropped and the next call opens a new one, so a restarted kubelet is found at once
    rather than after gRPC's reconnect backoff.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.socket_path = socket_path
        self.deadline_s = deadline_s
        self.max_response_bytes = max_response_bytes
        self._channel: grpc.aio.Channel | None = None
        self._stub: api_pb2_grpc.PodResourcesListerStub | None = None

    async def list(self) -> api_pb2.ListPodResourcesResponse:
        """Every pod on the node with the devices, CPUs and memory its containers were given."""
        response: api_pb2.ListPodResourcesResponse = await self._call(
            "List", api_pb2.ListPodResourcesRequest(), "Kubernetes 1.20 or later serves it"
        )
        return response

    async def allocatable(self) -> api_pb2.AllocatableResourcesResponse:
        """The devices the node can hand out, allocated or not (GetAllocatableResources)."""
        response: api_pb2.AllocatableResourcesResponse = await self._call(
            "GetAllocatableResources",
            api_pb2.AllocatableResourcesRequest(),
            "Kubernetes 1.23 or later serves it",
        )
        return response

    async def _call(self, method: str, request: Message, needs: str) -> Any:
        stub = self._open()
        try:
            return await getattr(stub, method)(request, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            await self.close()
            raise self._failure(exc, method, needs) from None

    async def close(self) -> None:
        """Drop the channel (if open); the next call opens a new one."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _open(self) -> api_pb2_grpc.PodResourcesListerStub:
        if self._stub is None:
            self._check_socket()
            self._channel = grpc.aio.insecure_channel(
                self._target(),
                options=[
                    ("grpc.max_receive_message_length", self.max_response_bytes),
                    ("grpc.enable_retries", 0),
                    # Channels share connections (and their reconnect backoff) by default: a
                    # fresh channel must try the socket now, not when an old backoff ends.
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        return self._stub

    def _target(self) -> str:
        return "unix:" + os.path.abspath(self.socket_path)

    def _check_socket(self) -> None:
        """Fail with the precise reason before gRPC turns it into a generic "unavailable"."""
        path = self.socket_path
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise AttributionFailed(
                f"no kubelet socket at {path}: mount /var/lib/kubelet/pod-resources into the agent "
                "(see deploy/kubernetes/agent.yaml) or pass --kubelet-socket"
            ) from None
        except PermissionError:
            raise AttributionFailed(
                f"cannot reach the kubelet socket at {path}: permission denied on its directory; "
                "run the agent as root (the kubelet's socket is root's only)"
            ) from None
        if not stat.S_ISSOCK(mode):
            raise AttributionFailed(f"{path} is not a socket: pass the kubelet's with --kubelet-socket")
        if not os.access(path, os.R_OK | os.W_OK):
            raise AttributionFailed(
                f"cannot connect to the kubelet socket at {path}: permission denied; "
                "run the agent as root (the kubelet's socket is root's only)"
            )

    def _failure(self, exc: grpc.aio.AioRpcError, method: str, needs: str) -> AttributionFailed:
        code = exc.code()
        where = f"kubelet at {self.socket_path}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return AttributionFailed(f"{where} did not answer {method} within {self.deadline_s:g} s")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return AttributionFailed(f"{where} does not serve pod-resources v1 {method}: {needs}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return AttributionFailed(
                f"{where}: the {method} answer is larger than {self.max_response_bytes} bytes"
            )
        reason = _gist(exc.details(), self._target())
        if code == grpc.StatusCode.UNAVAILABLE:
            return AttributionFailed(
                f"{where} is not answering gRPC ({reason}): is the kubelet running, "
                "and is this its pod-resources socket?"
            )
        return AttributionFailed(f"{where}: {method} failed: {code.name}: {reason}")
