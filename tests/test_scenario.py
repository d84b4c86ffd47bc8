"""The realistic fault scenario: deterministic, written as truth, and what it does to simulated GPUs."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from gpufleet.agent.sources.scenario import EXPERT, FleetScenario
from gpufleet.agent.sources.sim import SimulatedSource
from tests.conftest import ROOT

NS = 1_000_000_000
START = 1_800_000_000 * NS


def played(seed: int, hours: int = 24, nodes: int = 4) -> tuple[FleetScenario, list[SimulatedSource], str]:
    scenario = FleetScenario(nodes, 8, seed=seed, multiplier=5000, interval_s=60, start_ns=START)
    end = START + hours * 3600 * NS
    scenario.draw_until(end)
    now = [START]
    sources = [
        SimulatedSource("H100", 8, seed=seed, node_index=i, clock=lambda: now[0]) for i in range(nodes)
    ]
    for i, source in enumerate(sources):
        source.identity = (f"node-{i}", f"host-{i}")
    for step in range(hours * 60):
        now[0] = START + step * 60 * NS
        for i, source in enumerate(sources):
            scenario.advance(i, now[0], source)
            source.sample(with_processes=False)
    out = io.StringIO()
    scenario.write_truth(out, end, {"seed": seed})
    return scenario, sources, out.getvalue()


def test_the_same_seed_gives_the_same_truth_and_another_seed_another() -> None:
    assert played(3)[2] == played(3)[2]
    assert played(3)[2] != played(4)[2]


def test_the_truth_names_who_what_when_and_what_an_expert_would_do() -> None:
    _, _, text = played(3)
    rows = [json.loads(line) for line in text.splitlines()]
    run, episodes = rows[0], rows[1:]
    assert run["type"] == "run" and run["gpus"] == 32
    assert run["equivalent_gpu_days"] == run["simulated_gpu_days"] * 5000
    for episode in episodes:
        assert episode["node_id"].startswith("node-") and episode["start_unix_nano"] >= START
        if episode["gpu_index"] is not None:
            assert episode["uuid"].startswith("GPU-") and episode["serial"]
        if episode["kind"] in EXPERT:
            category, health, _, _ = EXPERT[episode["kind"]]
            assert (episode["category"], episode["expected_health"]) == (category, health)
    hard = [e for e in episodes if e["category"] == "hard"]
    assert hard and all(e["rma_at_occurrence"] == (1 if e["kind"] == "hbm_remap_failed" else 3) for e in hard)
    assert all(e["action_class"] == "rma" for e in hard if e["occurrence"] >= e["rma_at_occurrence"])
    precursors = [e for e in episodes if e["category"] == "precursor"]
    assert precursors and all(e["fails_at_unix_nano"] == e["end_unix_nano"] for e in precursors)


def test_a_reboot_brings_a_lost_gpu_back_and_keeps_lifetime_counters() -> None:
    source = SimulatedSource("H100", 8)
    source.inject(2, "fell_off_bus")
    source.inject(3, "hbm_remap_failed")
    source.gpu_at(4).faults.add_corrected(7)  # type: ignore[union-attr]
    source.rebooted()
    after = {s.index: s for s in source.sample(with_processes=False)}
    assert after[2].read_status == 1  # OK: back on the bus
    assert after[3].row_remap_failure and after[3].ecc_uncorrected_volatile == 0
    assert after[3].ecc_uncorrected_aggregate == 1
    assert after[4].ecc_corrected_aggregate == 7 and after[4].ecc_corrected_volatile == 0


def test_a_swapped_gpu_keeps_its_serial_in_its_new_slot() -> None:
    a, b = SimulatedSource("H100", 8, node_index=0), SimulatedSource("H100", 8, node_index=1)
    moving = a.gpu_at(1)
    assert moving is not None
    a.swap_gpu(1, b, 6)
    assert b.gpu_at(6) is moving and moving.index == 6
    assert {g.serial for g in b.inventory().gpus} >= {moving.serial}
    assert moving.serial not in {g.serial for g in a.inventory().gpus}


def test_a_hang_changes_what_the_gpu_does_not_who_holds_it() -> None:
    source = SimulatedSource("H100", 8, workload="training")
    source.set_workload(0, "training", pid=4242)
    source.override_behaviour(0, "stuck")
    hung = source.sample(with_processes=True)[0]
    assert hung.processes.processes[0].pid == 4242
    assert hung.gpu_utilization_percent >= 98 and hung.sm_active_ppm < 50_000
    assert source.behaviour_of(0) == "stuck"
    source.override_behaviour(0, None)
    assert source.behaviour_of(0) == "training"


def test_a_fault_due_while_its_node_is_down_happens_when_it_is_back() -> None:
    scenario = FleetScenario(1, 8, multiplier=0, interval_s=60, start_ns=START)
    episode = scenario._episode("gsp", 0, 5, START + 60 * NS, START + 3600 * NS)
    source = SimulatedSource("H100", 8, clock=lambda: START + 600 * NS)
    scenario.advance(0, START + 600 * NS, source)  # the node reports again ten minutes later
    assert episode.start_ns == START + 600 * NS and episode.end_ns == START + 4140 * NS


def test_the_agent_plays_the_realistic_preset() -> None:
    """The scenario starts an hour back: at a high enough rate the first sample already has faults."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "gpufleet.agent.main", "--source", "sim", "--faults", "realistic"),
            *("--fault-rate-multiplier", "1000000", "--once"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    gpus = json.loads(result.stdout)["gpus"]
    assert len(gpus) == 8
    assert any(gpu.get("xid_events") for gpu in gpus), gpus
    quiet = subprocess.run(
        [sys.executable, "-m", "gpufleet.agent.main", "--source", "sim", "--faults", "none", "--once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not any(gpu.get("xid_events") for gpu in json.loads(quiet.stdout)["gpus"])
