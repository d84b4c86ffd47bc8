"""The simulator: deterministic, realistic per the facts file, workloads that change, GPM from Hopper on."""

from __future__ import annotations

import pytest

from gpufleet.agent.sources.models import MIB, MODELS
from gpufleet.agent.sources.sim import (
    GPM_ARCHITECTURES,
    NVLINK_LINK_BYTES_PER_SECOND,
    REASON_GPU_IDLE,
    SimulatedSource,
)
from gpufleet.v1 import telemetry_pb2


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    a, b, c = (SimulatedSource("H100", 8, seed=s, node_index=3) for s in (1, 1, 2))
    assert a.inventory() == b.inventory()
    assert a.inventory() != c.inventory()
    for _ in range(5):
        assert a.sample(with_processes=True) == b.sample(with_processes=True)


def test_nodes_of_one_seed_have_distinct_gpus() -> None:
    uuids = {
        g.uuid for i in range(50) for g in SimulatedSource("H100", 8, seed=0, node_index=i).inventory().gpus
    }
    assert len(uuids) == 400


@pytest.mark.parametrize("model", sorted(MODELS))
def test_values_stay_within_the_models_figures(model: str) -> None:
    spec = MODELS[model]
    source = SimulatedSource(model, 8, seed=7, node_index=0)
    inventory = source.inventory()
    assert {g.name for g in inventory.gpus} == {spec.nvml_name}
    assert inventory.gpus[0].memory_total_bytes == spec.memory_total_mib * MIB
    for _ in range(200):
        for gpu in source.sample(with_processes=False):
            assert 0 <= gpu.gpu_utilization_percent <= 100
            assert gpu.power_draw_milliwatts <= spec.power_limit_max_w * 1000
            assert gpu.sm_clock_mhz <= spec.sm_clock_max_mhz
            assert gpu.memory_used_bytes + gpu.memory_free_bytes + gpu.memory_reserved_bytes == (
                spec.memory_total_mib * MIB
            )
            assert not gpu.HasField("fan_speed_percent")  # SXM boards report no fan


def test_idle_gpus_look_idle_and_workloads_change_over_time() -> None:
    workloads = set()
    source = SimulatedSource("H100", 8, seed=3, node_index=0)
    spec = MODELS["H100"]
    for _ in range(3000):
        samples = source.sample(with_processes=True)
        workloads.add(source.workload)
        if source.workload == "idle":
            gpu = samples[0]
            assert gpu.gpu_utilization_percent == 0
            assert gpu.clock_event_reasons & REASON_GPU_IDLE
            assert spec.idle_power_w[0] * 1000 <= gpu.power_draw_milliwatts <= spec.idle_power_w[1] * 1000
            assert len(gpu.processes.processes) == 0
    assert workloads == {"idle", "training", "inference"}


def test_energy_counter_only_grows_and_xids_are_delivered_once() -> None:
    source = SimulatedSource("A100", 2, seed=0, node_index=0, interval_s=10)
    first = source.sample(with_processes=False)[0].energy_millijoules
    source.inject_xid(1, 48)
    second = source.sample(with_processes=False)
    assert second[0].energy_millijoules > first
    assert [e.code for e in second[1].xid_events] == [48]
    assert not source.sample(with_processes=False)[1].xid_events


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="H100"):
        SimulatedSource("V100")


GPM_FIELDS = (
    "graphics_active_ppm",
    "sm_active_ppm",
    "sm_occupancy_ppm",
    "tensor_active_ppm",
    "dram_active_ppm",
    "fp64_active_ppm",
    "fp32_active_ppm",
    "fp16_active_ppm",
)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_gpm_from_hopper_on_absent_on_ampere(model: str) -> None:
    spec = MODELS[model]
    source = SimulatedSource(model, 8, seed=1, node_index=0, workload="training")
    gpm = spec.architecture in GPM_ARCHITECTURES
    assert gpm == (model != "A100")
    peak = spec.nvlink_links * NVLINK_LINK_BYTES_PER_SECOND.get(spec.architecture, 0)
    for _ in range(20):
        for gpu in source.sample(with_processes=False):
            for name in (*GPM_FIELDS, "nvlink_tx_bytes_per_second", "nvlink_rx_bytes_per_second"):
                assert gpu.HasField(name) == gpm, name
            if gpm:
                assert all(0 <= getattr(gpu, name) <= 1_000_000 for name in GPM_FIELDS)
                assert gpu.tensor_active_ppm <= gpu.sm_active_ppm <= gpu.graphics_active_ppm
                assert 0 < gpu.nvlink_tx_bytes_per_second <= peak
                assert 0 < gpu.nvlink_rx_bytes_per_second <= peak


def test_gpm_leaves_the_other_values_as_they_were() -> None:
    """GPM draws from a generator of its own: an H100 (GPM) and an A100 (none) draw the same shares."""
    h100, a100 = (SimulatedSource(m, 8, seed=5, node_index=1, workload="training") for m in ("H100", "A100"))
    for _ in range(50):
        for h, a in zip(h100.sample(with_processes=True), a100.sample(with_processes=True), strict=True):
            assert h.HasField("sm_active_ppm") and not a.HasField("sm_active_ppm")
            assert h.gpu_utilization_percent == a.gpu_utilization_percent
            assert h.memory_copy_utilization_percent == a.memory_copy_utilization_percent
            assert h.pcie_tx_bytes_per_second == a.pcie_tx_bytes_per_second


def held_samples(behaviour: str, count: int = 100) -> list[telemetry_pb2.GpuSample]:
    source = SimulatedSource("H100", 2, seed=2, node_index=0, workload="training")
    source.set_workload(1, behaviour, pid=4242)
    return [source.sample(with_processes=True)[1] for _ in range(count)]


def share(value: int) -> float:
    return value / 1_000_000


def test_a_training_gpu_keeps_its_sms_and_tensor_cores_busy() -> None:
    for gpu in held_samples("training"):
        assert gpu.gpu_utilization_percent >= 92
        assert 0.7 <= share(gpu.sm_active_ppm) <= 0.96
        assert 0.35 <= share(gpu.tensor_active_ppm) <= 0.75
        assert gpu.nvlink_tx_bytes_per_second > 0
        assert [(p.pid, p.name) for p in gpu.processes.processes] == [(4242, "python")]


def test_an_inference_gpu_is_bursty() -> None:
    samples = held_samples("inference")
    utilization = [gpu.gpu_utilization_percent for gpu in samples]
    sm = [share(gpu.sm_active_ppm) for gpu in samples]
    assert max(utilization) - min(utilization) >= 30
    assert max(sm) - min(sm) >= 0.25
    assert all(gpu.processes.processes[0].name == "tritonserver" for gpu in samples)


def test_an_idle_gpu_holds_memory_and_runs_nothing() -> None:
    spec = MODELS["H100"]
    for gpu in held_samples("idle"):
        assert gpu.gpu_utilization_percent == gpu.sm_active_ppm == gpu.tensor_active_ppm == 0
        assert gpu.clock_event_reasons & REASON_GPU_IDLE
        assert gpu.power_draw_milliwatts <= spec.idle_power_w[1] * 1000
        assert 0 < gpu.memory_used_bytes < 0.1 * spec.memory_total_mib * MIB
        assert [p.pid for p in gpu.processes.processes] == [4242]


def test_a_stuck_gpu_reads_busy_to_nvml_and_idle_to_gpm() -> None:
    spec = MODELS["H100"]
    for gpu in held_samples("stuck"):
        assert gpu.gpu_utilization_percent >= 98
        assert share(gpu.sm_active_ppm) <= 0.02
        assert gpu.tensor_active_ppm == 0
        assert gpu.nvlink_tx_bytes_per_second == gpu.nvlink_rx_bytes_per_second == 0
        assert (
            spec.idle_power_w[1] * 1000 < gpu.power_draw_milliwatts < 0.4 * spec.power_limit_default_w * 1000
        )
        assert not gpu.clock_event_reasons & REASON_GPU_IDLE
        assert len(gpu.processes.processes) == 1


def test_a_cleared_gpu_is_free_whatever_the_node_does() -> None:
    source = SimulatedSource("H100", 4, seed=0, node_index=0, workload="training")
    source.set_workload(0, "stuck", pid=77)
    source.clear_workload(1)
    assert [source.behaviour_of(i) for i in range(4)] == ["stuck", "free", "training", "training"]
    stuck, free, training, _ = source.sample(with_processes=True)
    assert [p.pid for p in stuck.processes.processes] == [77]
    assert free.gpu_utilization_percent == free.memory_used_bytes == free.sm_active_ppm == 0
    assert free.HasField("processes") and not free.processes.processes
    assert [p.pid for p in training.processes.processes] == [10_002]  # the node-wide job's
    source.set_workload(1, "inference")
    assert source.behaviour_of(1) == "inference"


def test_setting_an_unknown_behaviour_or_gpu_is_a_clear_error() -> None:
    source = SimulatedSource("H100", 2)
    with pytest.raises(ValueError, match="stuck"):
        source.set_workload(0, "mining")
    with pytest.raises(ValueError, match="no simulated GPU 5"):
        source.set_workload(5, "idle")
    with pytest.raises(ValueError, match="no simulated GPU 5"):
        source.clear_workload(5)
