"""The simulator: deterministic, realistic per the facts file, workloads that change."""

from __future__ import annotations

import pytest

from gpufleet.agent.sources.models import MIB, MODELS
from gpufleet.agent.sources.sim import REASON_GPU_IDLE, SimulatedSource


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
