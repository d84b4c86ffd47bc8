"""`python -m bench.agent_cost`: the agent's CPU time per GPU per interval, with GPM and without.

``NvmlSource.sample()`` runs on the fake NVML of tests/fake_nvml.py (no GPU needed; the bench
imports that test helper rather than keep a second fake), with the same H100 table once with
GPM supported and once without, and ``time.process_time`` measures the CPU that the sampling
thread's process spends. What it counts: the agent's own Python for the GPM samples, the
metrics request and its conversion, plus the fake's Python standing in for NVML. What it does
not: the time the real library and driver spend in ``nvmlGpmSampleGet`` (an ioctl) and
``nvmlGpmMetricsGet`` (arithmetic in C). The fake's own share of the GPM calls is measured
apart (the same calls on the fake alone) and shown, so the agent's share is the rest. With GPM
the agent also skips the two ``nvmlDeviceGetPcieThroughput`` calls (GPM gives PCIe over the
interval), which the difference nets out. The issue's target: GPM costs at most 1 ms of CPU
per GPU per interval.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

from gpufleet.agent.sources.nvml import GPM_ACTIVITY, GPM_THROUGHPUT, NvmlSource
from tests.fake_nvml import FakeNvml, fake_node, h100_table, pynvml

TARGET_US = 1000.0  # at most 1 ms of CPU per GPU per interval for GPM
ROUNDS = 5  # each measurement is the least of this many (the least disturbed by other work)
MIG_7 = ["1g.10gb"] * 7


class _Clock:
    """The source's clock, one interval further at each sample: GPM needs 100 ms between them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _node(gpus: int, *, gpm: bool, mig: list[str] | None) -> FakeNvml:
    tables: list[dict[str, Any]] = []
    for _ in range(gpus):
        table = h100_table()
        table["gpm_supported"] = gpm
        tables.append(table)
    nvml = fake_node(*tables)
    for index in range(gpus if mig else 0):
        nvml.set_mig(index, mig or [])
    return nvml


def _cpu_us_per_gpu(gpus: int, samples: int, *, gpm: bool, mig: list[str] | None = None) -> float:
    """CPU microseconds per GPU per ``sample()`` of a node of ``gpus`` H100s."""
    nvml = _node(gpus, gpm=gpm, mig=mig)
    clock = _Clock()
    source = NvmlSource(nvml, watch_xids=False, clock=clock)
    try:
        for _ in range(3):  # allocate the GPM buffers, take the first samples
            clock.now += 1.0
            source.sample(with_processes=False)
        start = time.process_time()
        for _ in range(samples):
            clock.now += 1.0
            source.sample(with_processes=False)
        elapsed = time.process_time() - start
    finally:
        source.close()
    return elapsed / samples / gpus * 1e6


def _fake_gpm_us_per_gpu(gpus: int, samples: int, *, mig: list[str] | None = None) -> float:
    """CPU microseconds per GPU per interval of the fake's GPM calls alone, as the agent makes them."""
    nvml = _node(gpus, gpm=True, mig=mig)
    whole = [int(getattr(pynvml, name)) for name, _ in (*GPM_ACTIVITY, *GPM_THROUGHPUT)]
    per_instance = [int(getattr(pynvml, name)) for name, _ in GPM_ACTIVITY]
    # Per GPU and GPU instance: how to take a sample into a buffer, and the metrics asked of it.
    takes: list[tuple[Callable[[Any], Any], list[int]]] = []
    for gpu in nvml.gpus:
        takes.append((functools.partial(nvml.nvmlGpmSampleGet, gpu.handle), whole))
        for device in gpu.migs:
            if device is not None:
                instance = device.gpu_instance_id
                takes.append(
                    (functools.partial(nvml.nvmlGpmMigSampleGet, gpu.handle, instance), per_instance)
                )
    work = []
    for take, metric_ids in takes:
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(metric_ids)
        for slot, metric_id in enumerate(metric_ids):
            request.metrics[slot].metricId = metric_id
        buffers = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
        take(buffers[0])
        work.append((take, request, buffers))
    start = time.process_time()
    for _ in range(samples):
        for take, request, buffers in work:
            previous, current = buffers
            take(current)
            request.sample1, request.sample2 = previous, current
            nvml.nvmlGpmMetricsGet(request)
            buffers.reverse()
    return (time.process_time() - start) / samples / gpus * 1e6


def _least_us(measure: Callable[..., float], *args: Any, **kwargs: Any) -> float:
    return min(measure(*args, **kwargs) for _ in range(ROUNDS))


def gpm_sample_cost(gpus: int = 8, samples: int = 200) -> dict[str, float]:
    """CPU microseconds per GPU per interval of ``NvmlSource.sample()``: with GPM, without, the difference.

    Also with every GPU in MIG mode as seven 1g.10gb instances (GPM per GPU instance too), and
    the fake NVML's share of the GPM calls in both (``fake_*``): the agent's is the rest.
    """
    cost: dict[str, float] = {"gpus": gpus, "samples": samples}
    for prefix, mig in (("", None), ("mig7_", MIG_7)):
        with_gpm = _least_us(_cpu_us_per_gpu, gpus, samples, gpm=True, mig=mig)
        without_gpm = _least_us(_cpu_us_per_gpu, gpus, samples, gpm=False, mig=mig)
        cost[f"{prefix}with_gpm_us"] = with_gpm
        cost[f"{prefix}without_gpm_us"] = without_gpm
        cost[f"{prefix}gpm_us"] = with_gpm - without_gpm
        cost[f"{prefix}fake_gpm_us"] = _least_us(_fake_gpm_us_per_gpu, gpus, samples, mig=mig)
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.agent_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpus", type=int, default=8, help="GPUs on the node (default 8)")
    parser.add_argument("--samples", type=int, default=200, help="intervals measured (default 200)")
    args = parser.parse_args()
    cost = gpm_sample_cost(args.gpus, args.samples)
    print(
        f"NvmlSource.sample() on the fake NVML: {cost['gpus']:.0f} H100s, "
        f"{cost['samples']:.0f} intervals, least of {ROUNDS} runs"
    )
    print(f"{'CPU us per GPU per interval':<30}{'whole GPUs':>12}{'MIG 7x1g':>12}")
    for label, key in (
        ("without GPM (unsupported)", "without_gpm_us"),
        ("with GPM", "with_gpm_us"),
        ("GPM: the difference", "gpm_us"),
        ("  of which the fake NVML's", "fake_gpm_us"),
    ):
        print(f"{label:<30}{cost[key]:>12.1f}{cost['mig7_' + key]:>12.1f}")
    met = max(cost["gpm_us"], cost["mig7_gpm_us"]) <= TARGET_US
    print(f"target: GPM at most {TARGET_US:.0f} us per GPU per interval: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
