"""A fleet that fails like a real one: noise, weak signatures, precursors, repeat offenders, and the truth.

``faults.FaultModel`` draws the Llama 3 run's faults, each with the exact signature a rule
looks for. A ``FleetScenario`` adds what makes a real fleet hard to judge, and writes down
what really happened (the ground truth) for a scorer to compare verdicts with:

- **noise** that must not cause a verdict: application XIDs, slowdown bits for an interval or
  two during heavy phases, brief NVML read errors, data stalls, collectives that wait an
  interval for a slow rank, agent restarts, planned reboots, one-off corrected-ECC bursts;
- **faults with a weak signature or none**: hung collectives (utilization 100 %, SMs and NVLink
  idle), GPUs whose clocks sag with no throttle bit, intermittent NVLink CRC growth, thermal
  interfaces, silent data corruption (no telemetry at all);
- **precursors** hours before some HBM and SRAM failures (a rising corrected-ECC rate, XID 92,
  a pending row remap), and precursor-like noise that leads nowhere;
- **repeat offenders**: a GPU whose fault comes back after every repair, and is moved to
  another node (same serial, new slot) on the way.

Each episode is drawn from a rate per 1,000 GPU-days (or node-days) times the fault-rate
multiplier, from one seed, and lives in simulated time (the source's clock). Every assumption
beyond gpu-fleet-facts.md is a named constant below, with its reason; docs/health-score.md
lists them. A hard fault is repaired (the node rebooted) after REPAIR_DELAY_S, where the
driver can reboot nodes (``FleetScenario.reboots_due``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any

from gpufleet.agent.sources.faults import HBM_REMAP_FAILURE_SHARE, LLAMA3_RATES, SECONDS_PER_DAY

if TYPE_CHECKING:
    from gpufleet.agent.sources.sim import SimulatedSource

NS = 1_000_000_000
HOUR_S = 3600

# -- what an expert would say, per kind: (category, verdict, action, action class) ----------------
# Categories: hard (an XID or a flag that says it), weak (a pattern over time or across GPUs),
# precursor (works now, fails later), noise (nothing wrong with the GPU), undetectable.
EXPERT: dict[str, tuple[str, str, str, str]] = {
    "fell_off_bus": ("hard", "lost", "reboot node", "reboot"),
    "gsp": ("hard", "unhealthy", "reset GPU", "reset"),
    "microcontroller": ("hard", "unhealthy", "reset GPU", "reset"),
    "nvlink": ("hard", "unhealthy", "reset GPU", "reset"),
    "hbm_remapped": ("hard", "unhealthy", "reset GPU", "reset"),
    "hbm_remap_failed": ("hard", "unhealthy", "drain node; RMA after field diagnostics", "rma"),
    "sram": ("hard", "unhealthy", "reset GPU", "reset"),
    "hung_collective": ("weak", "degraded", "restart the job from its checkpoint", "restart_job"),
    "clock_sag": ("weak", "degraded", "drain the GPU; inspect power delivery", "drain"),
    "nvlink_crc": ("weak", "degraded", "inspect or reseat the NVLink", "inspect_link"),
    "thermal": ("weak", "degraded", "check cooling", "cooling"),
    "ce_rising": ("precursor", "at_risk", "drain at the next checkpoint", "drain"),
    "xid92": ("precursor", "at_risk", "drain at the next checkpoint", "drain"),
    "remap_pending": ("precursor", "at_risk", "drain at the next checkpoint", "drain"),
    "silent_data_corruption": ("undetectable", "unhealthy", "drain node; run diagnostics", "drain"),
}
# The occurrence at which an expert sends a GPU back: a fault back after two reboots (gpud's
# escalation); at once for a row-remap failure (NVIDIA's RMA rule, facts section 4).
RMA_AT_OCCURRENCE = 3
RMA_AT_OCCURRENCE_BY_KIND = {"hbm_remap_failed": 1}

# -- rates per 1,000 GPU-days ---------------------------------------------------------------------
# Hard faults: the Llama 3 run's (faults.LLAMA3_RATES, facts section 2), HBM split into a remap
# that works and one that fails. A share of the HBM and SRAM ones come after a precursor.
HARD_RATES = {
    "fell_off_bus": LLAMA3_RATES["fell_off_bus"],
    "gsp": LLAMA3_RATES["gsp"],
    "microcontroller": LLAMA3_RATES["microcontroller"],
    "nvlink": LLAMA3_RATES["nvlink"],
    "hbm_remapped": LLAMA3_RATES["hbm"] * (1 - HBM_REMAP_FAILURE_SHARE),
    "hbm_remap_failed": LLAMA3_RATES["hbm"] * HBM_REMAP_FAILURE_SHARE,
    "sram": LLAMA3_RATES["sram"],
}
# Assumption: 60 % of memory failures show a precursor first (rising SBE before an HBM row fails
# is the pattern the facts file's "rising aggregate SBE -> watch" rule exists for); no public share.
PRECURSOR_SHARE = 0.6
# Which precursor, per failing kind (the remap failure's is the pending remaps that exhaust a bank).
PRECURSOR_OF = {"hbm_remapped": "ce_rising", "hbm_remap_failed": "remap_pending", "sram": "xid92"}
# Assumption: lead time log-normal, median 6 h, clipped to 30 min - 48 h ("hours before").
LEAD_MEDIAN_S = 6 * HOUR_S
LEAD_SIGMA = 0.8
LEAD_RANGE_S = (1800, 48 * HOUR_S)
# Weak-signature faults. Hung collectives: the Llama 3 run's network, NIC and NCCL-watchdog
# interruptions (0.040 + 0.008 + 0.008), all of which leave the GPUs of a job spinning in a
# collective; per node, on all its GPUs. Others: assumptions at the size of rare GPU faults.
WEAK_RATES = {
    "hung_collective": 0.056,
    "clock_sag": 0.02,
    "nvlink_crc": 0.02,
    "thermal": LLAMA3_RATES["thermal"],
    "silent_data_corruption": 0.007,  # facts section 2
}
# Background noise, per 1,000 GPU-days (node kinds per 1,000 node-days): what a fleet sees all
# the time, so it runs at its own rate (``noise_multiplier``, 1 by default), not compressed like
# the faults: compressed, two blips would coincide M times as often as they do. Assumptions, set
# high on purpose: a health model must stay quiet under far more noise than there are faults.
NOISE_RATES = {
    "app_xid": 20.0,  # XID 13/31/43/45 from user code (software bugs: facts section 2, x300)
    "throttle_blip": 50.0,  # HW slowdown or power brake for 1-2 reports during a power excursion
    "read_error": 10.0,  # NVML returns an error for 1-2 reports
    "data_stall": 10.0,  # a GPU waits on its input for 2-10 reports
    "ce_burst": 20.0,  # 1-40 corrected ECC errors at once, then none (a particle strike)
}
NODE_NOISE_RATES = {
    "collective_wait": 20.0,  # all GPUs wait 1-2 reports for a slow rank or a checkpoint barrier
    "agent_restart": 20.0,  # the agent restarts (an upgrade, an OOM kill); same boot
    "node_reboot": 10.0,  # planned maintenance
}
# Precursor-like noise: as rare as the faults it looks like, so compressed with them.
LOOKALIKE_RATES = {
    "ce_trickle": 0.3,  # a weak cell: 1-5 corrected errors an hour for days, never failing
    "xid92_isolated": 0.02,  # the driver's high-SBE-rate XID, with no failure after it
}
# Every kind of noise: nothing wrong with the GPU, whatever it looks like.
NOISE_KINDS = (*NOISE_RATES, *NODE_NOISE_RATES, *LOOKALIKE_RATES)
# Assumption: 15 % of GPUs that fail once keep failing: after each repair the fault returns
# within 2-24 h, up to REPEATS_MAX times; after the second, it is moved to another node.
REPEAT_SHARE = 0.15
REPEAT_AFTER_S = (2 * HOUR_S, 24 * HOUR_S)
REPEATS_MAX = 4
MOVE_AFTER_OCCURRENCE = 2
# A hard fault is repaired (the node rebooted) 30 min - 3 h after it (an operator's response).
REPAIR_DELAY_S = (1800, 3 * HOUR_S)
# A rebooting node is silent for this many reports.
REBOOT_SILENT_REPORTS = 2
# Durations (seconds) of the kinds that last.
HUNG_S = (600, 1800)  # until the NCCL watchdog (10-30 min) kills the job
SAG_RAMP_S = (1800, 2 * HOUR_S)  # the clock falls by SAG_DEPTH over this
SAG_DEPTH = (0.3, 0.45)
# An expert calls it a straggler once it runs 15 % slower than its peers, and busy peers run about
# a percent under their maximum clock: 16 % under its own.
SAG_EXPERT_SHARE = 0.16
SLOW_FAULT_S = (6 * HOUR_S, 24 * HOUR_S)  # clock sag, thermal: until the GPU is swapped
CRC_S = (2 * HOUR_S, 12 * HOUR_S)
CRC_BURST = (20, 200)  # CRC errors per burst, a burst every few reports
TRICKLE_S = (SECONDS_PER_DAY, 10 * SECONDS_PER_DAY)
CE_RISING_PER_HOUR = (10.0, 600.0)  # the corrected-error rate climbs over the lead time
# Clock event bits a power excursion trips for an interval (facts section 5).
HW_SLOWDOWN_BIT = 0x008
POWER_BRAKE_BIT = 0x080


@dataclass
class Episode:
    """One thing that happened to a GPU (gpu_index None: to the whole node), and what it calls for."""

    id: int
    category: str
    kind: str
    node_index: int
    gpu_index: int | None
    start_ns: int
    end_ns: int | None
    expected_health: str = "healthy"
    expected_action: str = "none"
    action_class: str = "none"
    occurrence: int = 1
    rma_at_occurrence: int | None = None
    fails_at_ns: int | None = None
    # Filled in when written: who it happened to.
    node_id: str = ""
    hostname: str = ""
    uuid: str = ""
    serial: str = ""
    # Per-kind parameters for the simulator (not written).
    params: dict[str, float] = field(default_factory=dict)

    def truth(self) -> dict[str, Any]:
        row = asdict(self)
        del row["params"], row["node_index"]
        # Times are written as the wire contract spells them (..._unix_nano).
        return {"type": "episode", **{_truth_key(k): v for k, v in row.items()}}


class FleetScenario:
    """Episodes for every node of a simulated fleet, drawn ahead of simulated time, played as it passes.

    The driver of the simulated fleet calls ``advance`` before each node's sample, carries out
    the reboots, GPU swaps and agent restarts it returns, and writes the truth at the end.
    """

    def __init__(
        self,
        nodes: int,
        gpus_per_node: int,
        *,
        seed: int = 0,
        multiplier: float = 1.0,
        noise_multiplier: float = 1.0,
        interval_s: float = 60.0,
        start_ns: int,
    ) -> None:
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.multiplier = multiplier
        self.noise_multiplier = noise_multiplier
        self.interval_s = interval_s
        self.start_ns = start_ns
        self.rng = random.Random(f"scenario:{seed}")
        self.episodes: list[Episode] = []
        self._drawn_until_ns = start_ns
        # Per node: episodes not started yet (drawn ahead), and those running.
        self._pending: list[list[Episode]] = [[] for _ in range(nodes)]
        self._running: list[list[Episode]] = [[] for _ in range(nodes)]
        # Which physical GPU sits in each slot (they move), its hard faults so far, the repeaters.
        self._slot = {(n, g): n * gpus_per_node + g for n in range(nodes) for g in range(gpus_per_node)}
        self._occurrences: dict[int, int] = {}
        self._repeaters: set[int] = set()
        self._next_physical = nodes * gpus_per_node
        self._next_id = 1
        self._touched: set[int] = set()
        # A failure's episode id -> the precursor that leads to it.
        self._precursor_of: dict[int, Episode] = {}

    # -- drawing ------------------------------------------------------------------------------

    @property
    def drawn_until_ns(self) -> int:
        return self._drawn_until_ns

    def _episode(self, kind: str, node: int, gpu: int | None, start_ns: int, end_ns: int | None) -> Episode:
        category, health, action, action_class = EXPERT.get(kind, ("noise", "healthy", "none", "none"))
        episode = Episode(
            self._next_id, category, kind, node, gpu, start_ns, end_ns, health, action, action_class
        )
        self._next_id += 1
        self._pending[node].append(episode)
        self._touched.add(node)
        return episode

    def _count(self, per_thousand_days: float, units: int, span_s: float, *, noise: bool = False) -> int:
        multiplier = self.noise_multiplier if noise else self.multiplier
        mean = per_thousand_days * multiplier / 1000 * units * span_s / SECONDS_PER_DAY
        return _poisson(self.rng, mean)

    def draw_until(self, until_ns: int) -> None:
        """Draw every episode that starts before ``until_ns`` (repeats are drawn as faults happen)."""
        begin = self._drawn_until_ns
        if until_ns <= begin:
            return
        span_s = (until_ns - begin) / NS
        gpus = self.nodes * self.gpus_per_node
        rng = self.rng

        def when() -> int:
            return begin + int(rng.random() * (until_ns - begin))

        def gpu_draws(rates: dict[str, float], noise: bool = False) -> None:
            for kind, rate in rates.items():
                for _ in range(self._count(rate, gpus, span_s, noise=noise)):
                    self._draw(kind, rng.randrange(self.nodes), rng.randrange(self.gpus_per_node), when())

        gpu_draws(HARD_RATES)
        gpu_draws(WEAK_RATES)
        gpu_draws(LOOKALIKE_RATES)
        gpu_draws(NOISE_RATES, noise=True)
        for kind, rate in NODE_NOISE_RATES.items():
            for _ in range(self._count(rate, self.nodes, span_s, noise=True)):
                self._draw(kind, rng.randrange(self.nodes), None, when())
        for node in self._touched:
            self._pending[node].sort(key=lambda e: e.start_ns)
        self._touched.clear()
        self._drawn_until_ns = until_ns

    def _draw(self, kind: str, node: int, gpu: int | None, at: int) -> None:
        rng = self.rng
        interval_ns = int(self.interval_s * NS)
        if kind in HARD_RATES:
            assert gpu is not None
            if kind in PRECURSOR_OF and rng.random() < PRECURSOR_SHARE:
                lead_s = rng.lognormvariate(math.log(LEAD_MEDIAN_S), LEAD_SIGMA)
                lead_s = min(max(lead_s, LEAD_RANGE_S[0]), LEAD_RANGE_S[1])
                start = max(at - int(lead_s * NS), self.start_ns)
                precursor = self._episode(PRECURSOR_OF[kind], node, gpu, start, at)
                precursor.fails_at_ns = at
                failure = self._episode(kind, node, gpu, at, at + int(rng.uniform(*REPAIR_DELAY_S) * NS))
                self._precursor_of[failure.id] = precursor
                return
            self._episode(kind, node, gpu, at, at + int(rng.uniform(*REPAIR_DELAY_S) * NS))
            return
        if kind == "hung_collective":
            end = at + int(rng.uniform(*HUNG_S) * NS)
            for index in range(self.gpus_per_node):
                self._episode(kind, node, index, at, end)
            return
        if kind == "clock_sag":
            ramp_s, depth = rng.uniform(*SAG_RAMP_S), rng.uniform(*SAG_DEPTH)
            episode = self._episode(kind, node, gpu, at, at + int(rng.uniform(*SLOW_FAULT_S) * NS))
            # The truth starts once it runs 15 % slower than its peers; the sag itself began before.
            episode.params.update(
                onset_ns=at - ramp_s * SAG_EXPERT_SHARE / depth * NS, ramp_s=ramp_s, depth=depth
            )
            return
        if kind in ("thermal", "nvlink_crc", "ce_trickle"):
            span = {"thermal": SLOW_FAULT_S, "nvlink_crc": CRC_S, "ce_trickle": TRICKLE_S}[kind]
            episode = self._episode(kind, node, gpu, at, at + int(rng.uniform(*span) * NS))
            episode.params["per_hour"] = rng.uniform(1, 5)
            return
        reports = {"data_stall": rng.randint(2, 10), "node_reboot": REBOOT_SILENT_REPORTS + 1}.get(
            kind, rng.randint(1, 2)
        )
        episode = self._episode(kind, node, gpu, at, at + reports * interval_ns)
        episode.params["reports"] = reports

    # -- playing ------------------------------------------------------------------------------

    def advance(self, node: int, now_ns: int, source: SimulatedSource) -> list[Action]:
        """Play what happens to ``node`` up to ``now_ns``; return what the driver must do."""
        actions: list[Action] = []
        pending = self._pending[node]
        while pending and pending[0].start_ns <= now_ns:
            episode = pending.pop(0)
            self._on_time(episode, now_ns)
            if self._start(episode, source, actions):
                self._running[node].append(episode)
                self.episodes.append(episode)
        still = []
        for episode in self._running[node]:
            if episode.end_ns is not None and episode.end_ns <= now_ns:
                self._end(episode, source, actions)
            else:
                self._during(episode, now_ns, source)
                still.append(episode)
        self._running[node] = still
        return actions

    def _on_time(self, episode: Episode, now_ns: int) -> None:
        """An episode due while its node was down (rebooting) happens now, when the node is back."""
        late = now_ns - episode.start_ns
        if late <= self.interval_s * NS or episode.category == "precursor":
            return
        episode.start_ns += late
        if episode.end_ns is not None:
            episode.end_ns += late
        precursor = self._precursor_of.get(episode.id)
        if precursor is not None:
            precursor.end_ns = precursor.fails_at_ns = episode.start_ns

    def _start(self, episode: Episode, source: SimulatedSource, actions: list[Action]) -> bool:
        """Begin an episode; False if it cannot happen (its GPU is gone)."""
        kind, node, index = episode.kind, episode.node_index, episode.gpu_index
        gpu = None if index is None else source.gpu_at(index)
        if index is not None and gpu is None:
            return False
        episode.node_id, episode.hostname = source.identity
        if gpu is not None:
            episode.uuid, episode.serial = gpu.uuid, gpu.serial
            if gpu.faults.lost and kind not in NOISE_KINDS:
                return False
        if kind in HARD_RATES:
            assert gpu is not None and index is not None
            self._hard_started(episode, source, actions)
            return True
        rng = self.rng
        if kind in ("hung_collective", "data_stall"):
            assert index is not None
            source.override_behaviour(index, "stuck" if kind == "hung_collective" else "idle")
        elif kind == "collective_wait":
            for other in source.gpu_indices():
                source.override_behaviour(other, "stuck")
        elif kind == "thermal":
            assert gpu is not None
            gpu.faults.thermal = True
        elif kind == "remap_pending":
            assert gpu is not None
            gpu.faults.remapped_correctable += 1
            gpu.faults.remap_pending_correctable = True
        elif kind == "xid92":
            assert gpu is not None
            episode.params["xid_at_ns"] = episode.start_ns + rng.uniform(0.1, 0.3) * (
                (episode.end_ns or episode.start_ns) - episode.start_ns
            )
        elif kind == "app_xid":
            assert gpu is not None
            source.queue_xid(gpu, rng.choice((13, 31, 43, 45)))
        elif kind == "xid92_isolated":
            assert gpu is not None
            source.queue_xid(gpu, 92)
        elif kind == "ce_burst":
            assert gpu is not None
            gpu.faults.add_corrected(rng.randint(1, 40))
        elif kind == "read_error":
            assert gpu is not None
            gpu.faults.read_errors = int(episode.params["reports"])
        elif kind == "agent_restart":
            actions.append(Action("restart", node))
        elif kind == "node_reboot":
            actions.append(Action("reboot", node))
        return True

    def _hard_started(self, episode: Episode, source: SimulatedSource, actions: list[Action]) -> None:
        node, index = episode.node_index, episode.gpu_index
        assert index is not None
        physical = self._slot[(node, index)]
        occurrence = self._occurrences.get(physical, 0) + 1
        self._occurrences[physical] = occurrence
        episode.occurrence = occurrence
        episode.rma_at_occurrence = RMA_AT_OCCURRENCE_BY_KIND.get(episode.kind, RMA_AT_OCCURRENCE)
        if occurrence >= episode.rma_at_occurrence:
            episode.expected_action, episode.action_class = "drain node; hardware inspection and RMA", "rma"
        source.inject(index, episode.kind)
        if occurrence == 1 and self.rng.random() < REPEAT_SHARE:
            self._repeaters.add(physical)

    def _during(self, episode: Episode, now_ns: int, source: SimulatedSource) -> None:
        index = episode.gpu_index
        gpu = None if index is None else source.gpu_at(index)
        if gpu is None:
            return
        kind, params, rng = episode.kind, episode.params, self.rng
        reports_per_hour = HOUR_S / self.interval_s
        if kind == "clock_sag":
            sagged = min((now_ns - params["onset_ns"]) / NS / params["ramp_s"], 1.0)
            gpu.faults.clock_factor = 1 - params["depth"] * max(sagged, 0.0)
        elif kind in ("ce_rising", "xid92", "remap_pending"):
            end = episode.end_ns or now_ns
            progress = min(max((now_ns - episode.start_ns) / max(end - episode.start_ns, 1), 0.0), 1.0)
            low, high = CE_RISING_PER_HOUR
            per_hour = low * (high / low) ** progress
            gpu.faults.add_corrected(_poisson(rng, per_hour / reports_per_hour))
            if kind == "xid92" and "xid_at_ns" in params and now_ns >= params["xid_at_ns"]:
                del params["xid_at_ns"]
                source.queue_xid(gpu, 92)
        elif kind == "ce_trickle":
            gpu.faults.add_corrected(_poisson(rng, params["per_hour"] / reports_per_hour))
        elif kind == "nvlink_crc":
            if rng.random() < 0.3:
                gpu.faults.nvlink_errors += rng.randint(*CRC_BURST)
        elif kind == "throttle_blip":
            gpu.faults.reasons_once |= rng.choice((HW_SLOWDOWN_BIT, POWER_BRAKE_BIT))

    def _end(self, episode: Episode, source: SimulatedSource, actions: list[Action]) -> None:
        kind, index = episode.kind, episode.gpu_index
        gpu = None if index is None else source.gpu_at(index)
        if kind in ("hung_collective", "data_stall") and index is not None:
            source.override_behaviour(index, None)
        elif kind == "collective_wait":
            for other in source.gpu_indices():
                source.override_behaviour(other, None)
        elif kind == "clock_sag" and gpu is not None:
            gpu.faults.clock_factor = 1.0
        elif kind == "thermal" and gpu is not None:
            gpu.faults.thermal = False
        elif kind in HARD_RATES and index is not None:
            self._repaired(episode, source, actions)

    def _repaired(self, episode: Episode, source: SimulatedSource, actions: list[Action]) -> None:
        """An operator repairs a hard fault: reboot; replace a GPU due for RMA; maybe move a repeater."""
        node, index = episode.node_index, episode.gpu_index
        assert index is not None
        physical = self._slot[(node, index)]
        if episode.action_class == "rma":
            self._slot[(node, index)] = self._next_physical
            self._next_physical += 1
            actions.append(Action("replace", node, index))
            return
        actions.append(Action("reboot", node))
        if physical not in self._repeaters or episode.occurrence >= REPEATS_MAX:
            return
        at_node, at_index = node, index
        if episode.occurrence == MOVE_AFTER_OCCURRENCE and self.nodes > 1:
            other = self.rng.choice([n for n in range(self.nodes) if n != node])
            other_index = self.rng.randrange(self.gpus_per_node)
            self._slot[(node, index)], self._slot[(other, other_index)] = (
                self._slot[(other, other_index)],
                physical,
            )
            actions.append(Action("swap", node, index, other, other_index))
            actions.append(Action("reboot", other))
            at_node, at_index = other, other_index
        again = (episode.end_ns or 0) + int(self.rng.uniform(*REPEAT_AFTER_S) * NS)
        repair = again + int(self.rng.uniform(*REPAIR_DELAY_S) * NS)
        self._episode(episode.kind, at_node, at_index, again, repair)
        self._pending[at_node].sort(key=lambda e: e.start_ns)

    # -- the truth ----------------------------------------------------------------------------

    def write_truth(self, out: IO[str], end_ns: int, run: dict[str, Any]) -> int:
        """Write the run and every episode that began before ``end_ns``; return how many episodes."""
        simulated_days = self.nodes * self.gpus_per_node * (end_ns - self.start_ns) / NS / SECONDS_PER_DAY
        header = {
            "type": "run",
            **run,
            "nodes": self.nodes,
            "gpus": self.nodes * self.gpus_per_node,
            "interval_s": self.interval_s,
            "start_unix_nano": self.start_ns,
            "end_unix_nano": end_ns,
            "fault_rate_multiplier": self.multiplier,
            "noise_multiplier": self.noise_multiplier,
            "simulated_gpu_days": simulated_days,
            "equivalent_gpu_days": simulated_days * self.multiplier,
        }
        out.write(json.dumps(header) + "\n")
        written = 0
        for episode in sorted(self.episodes, key=lambda e: e.start_ns):
            if episode.start_ns < end_ns:
                out.write(json.dumps(episode.truth()) + "\n")
                written += 1
        return written


# The agent's --faults preset that plays a FleetScenario.
REALISTIC = "realistic"
# The realistic preset of a running agent (no driver): drawn this far ahead, starting this far back
# (so that a fleet starts with a few faults and precursors under way, as a real one would).
# Ahead by the longest lead time, so that every precursor of a coming failure is under way; in
# steps of an hour.
DRAW_AHEAD_S = LEAD_RANGE_S[1]
DRAW_STEP_S = HOUR_S
HISTORY_S = HOUR_S


def agent_players(
    nodes: int, gpus_per_node: int, *, seed: int, multiplier: float, interval_s: float, now_ns: int
) -> list[Callable[[SimulatedSource], None]]:
    """One scenario hook per simulated node of an agent process (``SimulatedSource(scenario=...)``).

    The agent plays the faults, noise and precursors as they come. Repairs, reboots and GPU
    swaps need a driver that can reboot nodes (bench/health_fleet.py); here a fault stays.
    """
    scenario = FleetScenario(
        nodes,
        gpus_per_node,
        seed=seed,
        multiplier=multiplier,
        interval_s=interval_s,
        start_ns=now_ns - HISTORY_S * NS,
    )

    def player(index: int) -> Callable[[SimulatedSource], None]:
        def play(source: SimulatedSource) -> None:
            now = source.clock()
            if scenario.drawn_until_ns < now + (DRAW_AHEAD_S - DRAW_STEP_S) * NS:
                scenario.draw_until(now + DRAW_AHEAD_S * NS)
            scenario.advance(index, now, source)

        return play

    return [player(index) for index in range(nodes)]


@dataclass(frozen=True)
class Action:
    """What the driver must do for the scenario: reboot a node, restart its agent, replace or swap GPUs."""

    what: str  # "reboot", "restart", "replace", "swap"
    node: int
    gpu: int | None = None
    other_node: int | None = None
    other_gpu: int | None = None


def _truth_key(name: str) -> str:
    return name.removesuffix("_ns") + "_unix_nano" if name.endswith("_ns") else name


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's for small means, a normal approximation for large ones)."""
    if mean <= 0:
        return 0
    if mean > 30:
        return max(round(rng.gauss(mean, math.sqrt(mean))), 0)
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count
