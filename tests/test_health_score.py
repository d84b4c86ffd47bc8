"""bench/health_score.py: verdict timelines scored against a simulator's ground truth."""

from __future__ import annotations

import ast
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from bench import health_score
from bench.health_score import action_class, goals, markdown, score, truth_from_rows
from gpufleet import event_kinds as kinds

T0 = 1_700_000_000 * 10**9
SECOND = 10**9
HOUR = 3600
INTERVAL = 10  # seconds per report
DAY = 24 * HOUR


def at(seconds: float) -> int:
    return T0 + round(seconds * SECOND)


def run_row(nodes: int = 1, gpus: int = 8, days: float = 1.0, multiplier: float = 1.0) -> dict[str, Any]:
    return {
        "type": "run",
        "seed": 7,
        "nodes": nodes,
        "gpus": gpus,
        "interval_s": float(INTERVAL),
        "start_unix_nano": T0,
        "end_unix_nano": at(days * DAY),
        "fault_rate_multiplier": multiplier,
        "simulated_gpu_days": gpus * days,
        "equivalent_gpu_days": gpus * days * multiplier,
    }


def episode(
    id_: int,
    category: str,
    kind: str,
    start: float,
    end: float | None = None,
    *,
    gpu: int | None = 0,
    node: str = "n1",
    action: str = "none",
    serial: str = "",
    occurrence: int = 1,
    rma_at: int | None = None,
    fails_at: float | None = None,
) -> dict[str, Any]:
    return {
        "type": "episode",
        "id": id_,
        "category": category,
        "kind": kind,
        "node_id": node,
        "hostname": f"host-{node}",
        "gpu_index": gpu,
        "uuid": f"GPU-{serial}" if serial else "",
        "serial": serial,
        "start_unix_nano": at(start),
        "end_unix_nano": None if end is None else at(end),
        "expected_health": "unhealthy",
        "expected_action": action,
        "action_class": action,
        "occurrence": occurrence,
        "rma_at_occurrence": rma_at,
        "fails_at_unix_nano": None if fails_at is None else at(fails_at),
    }


class Log:
    """An event log as the collector writes it (event_row dicts with ISO times)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def _add(
        self, kind: str, seconds: float, node: str, gpu: int | None, action: str, **attributes: str
    ) -> None:
        moment = datetime.fromtimestamp(at(seconds) / 1e9, timezone.utc)
        self.rows.append(
            {
                "id": len(self.rows) + 1,
                "time": moment.isoformat(timespec="milliseconds"),
                "severity": "warning",
                "node": f"host-{node}",
                "node_id": node,
                "gpu": gpu,
                "kind": kind,
                "reason": f"{kind} at {seconds}",
                "action": action,
                "attributes": attributes,
            }
        )

    def health(self, seconds: float, new: str, gpu: int = 0, *, node: str = "n1", action: str = "") -> None:
        self._add(kinds.HEALTH_CHANGED, seconds, node, gpu, action, old="?", new=new)

    def rma(self, seconds: float, serial: str, gpu: int = 0, *, node: str = "n1", uuid: str = "") -> None:
        attributes = {"serial": serial, "uuid": uuid} if serial else {"uuid": uuid}
        self._add(kinds.RMA_DUE, seconds, node, gpu, "drain node; hardware inspection and RMA", **attributes)


def scored(rows: list[dict[str, Any]], log: Log, **run: Any) -> dict[str, Any]:
    return score(truth_from_rows([run_row(**run), *rows]), log.rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("drain node; hardware inspection and RMA", "rma"),
        ("reset GPU now; repeated: RMA path", "rma"),
        ("reset GPU or reboot node", "reset"),  # the action named first
        ("reboot node, or reset the GPU", "reboot"),
        ("drain node and reset GPU", "drain"),
        ("drain at the next checkpoint; run diagnostics", "drain"),
        ("restart the application; check PCIe", "restart_job"),
        ("check cooling", "cooling"),
        ("inspect the NVLink", "inspect_link"),
        ("see the information", "none"),  # "rma" only as a word
        ("", "none"),
    ],
)
def test_action_text_classes(text: str, expected: str) -> None:
    assert action_class(text) == expected


def test_hard_faults_on_time_late_missed_and_already_failed() -> None:
    rows = [
        episode(1, "hard", "fell_off_bus", 100, 1000, gpu=0, action="reboot"),
        episode(2, "hard", "gsp", 100, 1000, gpu=1, action="reset"),
        episode(3, "hard", "sram", 100, 200, gpu=2, action="reset"),
        episode(4, "hard", "nvlink", 500, 900, gpu=0, action="reset"),  # GPU 0 still lost from #1
    ]
    log = Log()
    log.health(105, "lost", 0, action="reboot node")  # half an interval: on time
    log.health(130, "unhealthy", 1, action="reset GPU")  # three intervals: late
    log.health(2000, "healthy", 0)
    hard = scored(rows, log)["hard"]
    overall = hard["overall"]
    assert (overall["episodes"], overall["detected"], overall["on_time"]) == (4, 3, 2)
    assert overall["recall"] == 0.75 and overall["on_time_share"] == 0.5
    assert overall["already_detected"] == 1
    assert overall["latency_p50_intervals"] == 0.5 and overall["latency_p99_intervals"] == pytest.approx(2.95)
    # #4 was "detected" by #1's reboot action, not the reset the NVLink fault needs.
    assert overall["action_correct"] == 2
    assert hard["kinds"]["gsp"]["latency_p50_intervals"] == 3.0 and hard["kinds"]["gsp"]["on_time"] == 0
    assert hard["kinds"]["sram"]["detected"] == 0
    assert hard["missed"] == [{"episode": 3, "kind": "sram", "node_id": "n1", "gpu": 2}]


def test_an_rma_action_satisfies_reboot_only_on_a_repeat() -> None:
    rows = [
        episode(
            1, "hard", "fell_off_bus", 100, 200, gpu=0, action="reboot", serial="A", occurrence=3, rma_at=3
        ),
        episode(
            2, "hard", "fell_off_bus", 100, 200, gpu=1, action="reboot", serial="B", occurrence=1, rma_at=3
        ),
        episode(3, "hard", "hbm_remap_failed", 100, 200, gpu=2, action="rma", serial="C", rma_at=1),
        episode(4, "hard", "gsp", 100, 200, gpu=3, action="rma", serial="D", occurrence=3, rma_at=3),
    ]
    log = Log()
    for gpu in range(3):
        log.health(100, "unhealthy", gpu, action="drain node; hardware inspection and RMA")
    log.health(100, "unhealthy", 3, action="reset GPU")
    kinds_ = scored(rows, log)["hard"]["kinds"]
    assert kinds_["fell_off_bus"]["action_correct"] == 1  # A, not B
    assert kinds_["hbm_remap_failed"]["action_share"] == 1.0
    assert kinds_["gsp"]["action_correct"] == 0  # an rma truth takes rma only


def test_a_node_wide_fault_is_a_case_on_every_gpu_of_the_node() -> None:
    log = Log()
    log.health(100, "lost", 0, node="n2")
    hard = scored([episode(1, "hard", "fell_off_bus", 100, 500, gpu=None, node="n2")], log, nodes=2, gpus=4)
    assert hard["hard"]["overall"]["episodes"] == 2 and hard["hard"]["overall"]["detected"] == 1


def test_millisecond_event_times_still_detect_at_the_start() -> None:
    # The fault starts 0.7 ms into a millisecond; the ISO time of its verdict reads the millisecond.
    row = episode(1, "hard", "gsp", 100.0007, 500, action="reset")
    log = Log()
    log.health(100.0008, "unhealthy", action="reset GPU")
    hard = scored([row], log)["hard"]["overall"]
    assert hard["detected"] == 1 and hard["already_detected"] == 0 and hard["latency_p99_intervals"] == 0


def test_hung_collective_across_gpus_and_a_false_degraded_verdict() -> None:
    rows = [
        *(
            episode(gpu + 1, "weak", "hung_collective", 100, 300, gpu=gpu, action="restart_job")
            for gpu in range(3)
        ),
        episode(4, "weak", "clock_sag", 100, gpu=5, action="drain"),
        episode(5, "noise", "app_xid", 4990, 5010, gpu=7),
    ]
    log = Log()
    log.health(120, "degraded", 0, action="restart the job")
    log.health(120, "degraded", 1, action="restart the job")
    log.health(310, "degraded", 2)  # after the episode ended (within its window: no false verdict)
    log.health(140, "degraded", 5, action="drain at the next checkpoint")
    log.health(5000, "degraded", 7, action="reset GPU")  # explained by no fault
    result = scored(rows, log)
    hung, sag = result["weak"]["kinds"]["hung_collective"], result["weak"]["kinds"]["clock_sag"]
    assert (hung["episodes"], hung["detected"], hung["action_correct"]) == (3, 2, 2)
    assert hung["latency_p50_intervals"] == 2.0 and hung["latency_p99_intervals"] == 2.0
    assert hung["false_positives"] == 1 and hung["precision"] == pytest.approx(2 / 3)
    assert sag["detected"] == 1 and sag["precision"] == 0.5 and sag["latency_p99_intervals"] == 4.0
    noise = result["noise"]
    assert noise["false_verdicts"] == 1 and noise["outside_noise"] == 0
    assert noise["kinds"] == {"app_xid": {"episodes": 1, "false_verdicts": 1}}
    assert noise["examples"][0]["gpu"] == 7 and noise["examples"][0]["noise"] == ["app_xid"]


def test_a_weak_fault_seen_after_five_intervals_is_late_and_misses_its_goal() -> None:
    log = Log()
    log.health(160, "degraded", 0)
    score = scored([episode(1, "weak", "clock_sag", 100)], log)
    weak = score["weak"]["kinds"]["clock_sag"]
    assert weak["detected"] == 1 and weak["on_time"] == 0 and weak["latency_p99_intervals"] > 5
    (goal,) = [g for g in goals(score) if g["name"] == "Weak faults: clock_sag"]
    assert not goal["met"]


def test_noise_counts_onsets_and_rates_per_gpu_days() -> None:
    log = Log()
    log.health(100, "degraded", 3)
    log.health(110, "unhealthy", 3)  # worse, not a second onset
    log.health(120, "healthy", 3)
    log.health(200, "unreachable", 3)
    log.health(210, "degraded", 3)  # from unreachable: an onset
    log.health(300, "at_risk", 4)  # an early warning, not a false verdict
    noise = scored([], log, gpus=16, multiplier=1000)["noise"]
    assert noise["false_verdicts"] == 2 and noise["outside_noise"] == 2
    assert noise["per_10k_simulated_gpu_days"] == 1250.0
    assert noise["per_10k_equivalent_gpu_days"] == 1.25


def test_early_warnings_lead_time_and_false_warnings() -> None:
    rows = [
        episode(1, "precursor", "ce_rising", 1000, gpu=0, fails_at=1000 + 3 * HOUR),
        episode(2, "precursor", "xid92", 1000, gpu=1, fails_at=1000 + HOUR),
        episode(3, "precursor", "remap_pending", 1000, gpu=2, fails_at=1000 + HOUR),
        episode(4, "noise", "ce_burst", 2000, 2100, gpu=3),
        episode(5, "hard", "gsp", 3000, 4000, gpu=4, action="reset"),
    ]
    log = Log()
    log.health(1000 + HOUR, "at_risk", 0)  # two hours' lead
    log.health(1000 + HOUR / 2, "at_risk", 1)  # half an hour's lead
    log.health(2050, "at_risk", 3)  # during precursor-like noise: false
    log.health(3000, "unhealthy", 4, action="reset GPU")
    log.health(3500, "at_risk", 4)  # after a hard fault: neither
    warnings = scored(rows, log)["early_warnings"]
    assert (warnings["true_onsets"], warnings["false_onsets"]) == (2, 1)
    assert warnings["precision"] == pytest.approx(2 / 3)
    assert (warnings["precursors"], warnings["detected"]) == (3, 2)
    assert warnings["lead_time_median_hours"] == pytest.approx(1.25)
    assert warnings["lead_time_p10_hours"] == pytest.approx(0.65)
    assert warnings["kinds"]["remap_pending"]["detected"] == 0
    assert warnings["kinds"]["ce_rising"]["lead_time_median_hours"] == pytest.approx(2.0)
    assert warnings["noise_like"] == {"ce_burst": {"episodes": 1, "at_risk_onsets": 1}}


def _repeats(serial: str, gpu: int, starts: list[float], first_id: int) -> list[dict[str, Any]]:
    return [
        episode(
            first_id + n,
            "hard",
            "gsp",
            start,
            start + 100,
            gpu=gpu,
            action="reset",
            serial=serial,
            occurrence=n + 1,
            rma_at=3,
        )
        for n, start in enumerate(starts)
    ]


def test_rma_on_time_early_late_missed_too_soon_and_healthy() -> None:
    rows = [
        *_repeats("A", 0, [1000, 5000, 9000], 10),
        *_repeats("B", 1, [1000, 5000, 9000], 20),
        episode(30, "hard", "hbm_remap_failed", 2000, 2100, gpu=2, serial="C", action="rma", rma_at=1),
        *_repeats("D", 3, [1000, 5000, 9000], 40),
        *_repeats("E", 4, [1000], 50),
    ]
    log = Log()
    log.rma(9005, "", 0, uuid="GPU-A")  # on its third occurrence, found by UUID
    log.rma(5005, "B", 1)  # on its second: early
    log.rma(9005, "B", 1)  # a later flag does not make up for the first
    log.rma(2100, "C", 2)  # ten intervals after the remap failure: late
    log.rma(1005, "E", 4)  # one fault: too soon
    log.rma(500, "F", 6)  # never failed
    rma = scored(rows, log)["rma"]
    outcomes = {row["serial"]: row["outcome"] for row in rma["serials"]}
    assert outcomes == {
        "A": "on_time",
        "B": "early",
        "C": "late",
        "D": "missed",
        "E": "too_soon",
        "F": "healthy_flagged",
    }
    assert (rma["due"], rma["on_time"], rma["early"], rma["late"], rma["missed"]) == (4, 1, 1, 1, 1)
    assert (rma["too_soon"], rma["healthy_flagged"]) == (1, 1)
    by_serial = {row["serial"]: row for row in rma["serials"]}
    assert by_serial["C"]["delay_intervals"] == 10.0 and by_serial["C"]["expected_occurrence"] == 1
    assert by_serial["F"]["node_id"] == "n1" and by_serial["F"]["gpu"] == 6


def test_undetectable_episodes_detected_anyway() -> None:
    rows = [
        episode(1, "undetectable", "silent_data_corruption", 100, 500, gpu=0),
        episode(2, "undetectable", "silent_data_corruption", 100, 500, gpu=1),
    ]
    log = Log()
    log.health(120, "degraded", 0)  # explained by the episode: no false verdict
    result = scored(rows, log)
    assert result["undetectable"] == {"episodes": 2, "detected": 1}
    assert result["noise"]["false_verdicts"] == 0


def _fleet_meeting_every_goal() -> tuple[list[dict[str, Any]], Log]:
    rows = [
        episode(1, "hard", "gsp", 100, 200, gpu=0, action="reset"),
        episode(2, "weak", "hung_collective", 100, 300, gpu=1, action="restart_job"),
        episode(3, "weak", "clock_sag", 100, gpu=2, action="drain"),
        episode(4, "precursor", "ce_rising", 1000, gpu=3, fails_at=1000 + 2 * HOUR),
        *_repeats("R", 4, [1000, 5000, 9000], 10),
    ]
    log = Log()
    log.health(105, "unhealthy", 0, action="reset GPU")
    log.health(120, "degraded", 1, action="restart the job")
    log.health(130, "degraded", 2, action="drain at the next checkpoint")
    log.health(1000, "at_risk", 3)
    for start in (1000, 5000, 9000):
        log.health(start, "unhealthy", 4, action="reset GPU")
        log.health(start + 100, "healthy", 4)
    log.rma(9000, "R", 4)
    return rows, log


def test_goals_all_met() -> None:
    rows, log = _fleet_meeting_every_goal()
    results = goals(scored(rows, log, multiplier=10_000))
    assert [goal for goal in results if not goal["met"]] == []
    assert all(goal["shortfall"] == "" for goal in results)
    assert len(results) == 9


def test_goals_missed_say_by_how_much() -> None:
    rows, log = _fleet_meeting_every_goal()
    rows.append(episode(99, "hard", "sram", 100, 200, gpu=7, action="reset"))  # never detected
    log.health(150, "degraded", 6)  # a false verdict: noise and weak precision
    log.rma(100, "X", 5)  # a healthy GPU flagged
    log.rows = [row for row in log.rows if row["kind"] != kinds.HEALTH_CHANGED or row["gpu"] != 3]
    results = {goal["name"]: goal for goal in goals(scored(rows, log, multiplier=1))}
    missed = {name for name, goal in results.items() if not goal["met"]}
    assert missed == {
        "Hard faults: recall",
        "Noise: false degraded-or-worse verdicts",
        "Weak faults: hung_collective",
        "Weak faults: clock_sag",
        "Early warnings: precision",
        "Early warnings: lead time",
        "RMA: no healthy GPU flagged",
    }
    assert results["Hard faults: recall"]["shortfall"] == "recall 80 %, 20 % short"
    assert results["Weak faults: hung_collective"]["shortfall"] == "precision 50 %, 40 % short"
    assert results["Early warnings: precision"]["shortfall"].startswith("not measured")
    assert results["RMA: no healthy GPU flagged"]["shortfall"] == "1 flagged wrongly"
    assert results["Hard faults: latency"]["met"]


def test_markdown_renders_the_header_goals_and_every_section() -> None:
    rows, log = _fleet_meeting_every_goal()
    result = scored(rows, log, multiplier=10_000)
    header = {"date": "2025-01-02", "seed": 7, "command": "python -m bench.health_fleet --seed 7"}
    text = markdown(result, goals(result), header)
    assert text.startswith(
        "- date: 2025-01-02\n- seed: 7\n- command: `python -m bench.health_fleet --seed 7`\n"
    )
    for heading in ("Goals", "Hard faults", "Weak faults", "Noise", "Early warnings", "RMA", "Undetectable"):
        assert f"\n## {heading}\n" in text
    assert "| Hard faults: recall | 100 % | 100 % (4 of 4) | yes |" in text
    assert "| gsp | 4 | 4 | 100 % | 100 % | 0.00 / 0.48 | 4 (100 %) |" in text
    assert "| ce_rising | 1 | 1 | 100 % | 2.00 h | 2.00 h |" in text
    assert "**no**" not in text


def test_percent_is_truncated_not_rounded_up_to_the_goal() -> None:
    assert health_score._pct(0.9996) == "99.9 %"
    assert health_score._pct(1.0) == "100 %" and health_score._pct(None) == "n/a"


def test_reads_truth_and_events_from_json_lines(tmp_path: Path) -> None:
    truth_path, events_path = tmp_path / "truth.jsonl", tmp_path / "events.jsonl"
    truth_path.write_text(
        "\n".join(json.dumps(row) for row in [run_row(), episode(1, "hard", "gsp", 100, 200)])
    )
    log = Log()
    log.health(100, "unhealthy")
    log.rows[0]["time_unix_nano"] = at(115)  # preferred to the ISO time
    events_path.write_text("\n".join(json.dumps(row) for row in log.rows) + "\n\n")
    truth = health_score.load_truth(truth_path)
    assert truth.run.interval_ns == INTERVAL * SECOND and truth.episodes[0].kind == "gsp"
    hard = score(truth, health_score.load_events(events_path))["hard"]["overall"]
    assert hard["latency_p50_intervals"] == 1.5


def test_imports_only_the_standard_library_and_event_kinds() -> None:
    tree = ast.parse(Path(health_score.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"gpufleet"}  # `from gpufleet import event_kinds`
    assert not any("collector" in name for name in imported)
