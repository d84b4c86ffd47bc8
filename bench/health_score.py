"""Score a health model's verdicts against a fleet simulator's ground truth (docs/health-score.md).

The truth is the simulator's JSON Lines file: a ``run`` line, then one ``episode`` line per fault,
precursor or noise event it injected. The verdicts are the collector's event log: a GPU's health is
a step function of its ``health_changed`` events (sorted by time, then id), healthy until the
first; ``unreachable`` is no verdict (healthy for false verdicts, no detection). Nothing here
knows the health rules, so the score cannot share a mistake with them.

How each thing is counted (I is one report interval):

- An episode with no GPU (node-wide) is a case on every GPU of its node: those seen in the
  episodes and events, and at least indices 0 to gpus/nodes - 1. Every other count is per case.
- Hard faults: detected when the GPU is unhealthy or lost at some time in [start, end] (at least
  [start, start + I]); on time when by start + I; latency from start to the first change into
  unhealthy or lost. A GPU already failed at the start (an earlier fault still open) is detected
  at latency 0 and counted apart (``already_detected``).
- Weak faults: detected when degraded or worse at some time while the episode lasts (an error
  rate over an hour takes most of one); on time when by start + 5 I. An onset (a change into
  degraded or worse from healthy, at risk or unreachable) that no hard, weak or undetectable
  episode's window on its GPU explains (window: [start - I, end + 2 I], end = the run's end
  when open) is a false verdict: the noise count, and a false positive charged to every weak
  kind's precision.
- Early warnings: an onset into at_risk is true when its GPU has a precursor with
  start - I <= onset <= fails_at, ignored inside a hard fault's window, false otherwise. A
  precursor is detected by such an onset; its lead time is fails_at minus the first.
- RMA: a serial is due at its first hard episode whose occurrence reaches rma_at_occurrence. Its
  first ``rma_due`` event is on time in [that start, start + I], early before, late after, missed
  if none. A flag on a serial never due is "too soon" if it had hard faults, else "healthy".
- Undetectable: detected anyway when degraded or worse at some time in [start, start + 5 I].

An action's text gives its class, case-insensitive: the word "rma" or "hardware inspection"
anywhere -> rma (sending the GPU back decides everything else); otherwise the action named first
in the text: "reboot" -> reboot; "reset" -> reset; "drain" -> drain; "restart" -> restart_job;
"cooling" -> cooling; "link" -> inspect_link; none of them -> none. It is correct when it is
the truth's action_class, or when the truth says reboot and it says rma on a repeat that reached
rma_at_occurrence (an rma truth takes rma only).

Event times in the log may have millisecond resolution (event_row's ISO time, truncated), so each
window opens at the start of its millisecond. Percentiles interpolate linearly between ranks.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from gpufleet import event_kinds as kinds

HEALTHY = "healthy"
AT_RISK = "at_risk"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
LOST = "lost"
FAILED = frozenset({UNHEALTHY, LOST})
DEGRADED_OR_WORSE = frozenset({DEGRADED, UNHEALTHY, LOST})

# The categories whose windows explain a degraded-or-worse verdict on their GPU.
EXPLAINING = frozenset({"hard", "weak", "undetectable"})
PRECURSOR_LIKE_NOISE = ("ce_burst", "ce_trickle", "xid92_isolated")
# The weak kinds with goals of their own: hung collectives and silent stragglers.
GOAL_WEAK_KINDS = ("hung_collective", "clock_sag")
WEAK_INTERVALS = 5
EXAMPLES = 20  # missed episodes and false verdicts listed in the score, at most

ACTION_CLASSES = (
    ("rma", re.compile(r"\brma\b|hardware inspection", re.IGNORECASE)),
    ("reboot", re.compile("reboot", re.IGNORECASE)),
    ("reset", re.compile("reset", re.IGNORECASE)),
    ("drain", re.compile("drain", re.IGNORECASE)),
    ("restart_job", re.compile("restart", re.IGNORECASE)),
    ("cooling", re.compile("cooling", re.IGNORECASE)),
    ("inspect_link", re.compile("link", re.IGNORECASE)),
)

MS_NS = 1_000_000
HOUR_NS = 3600 * 10**9
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

Key = tuple[str, int]  # (node_id, GPU index)


@dataclass(frozen=True)
class Run:
    seed: int
    nodes: int
    gpus: int
    interval_ns: int
    start: int
    end: int
    fault_rate_multiplier: float
    simulated_gpu_days: float
    equivalent_gpu_days: float


@dataclass(frozen=True)
class Episode:
    id: int
    category: str
    kind: str
    node_id: str
    gpu_index: int | None  # None: the whole node
    serial: str
    uuid: str
    start: int
    end: int | None  # None: until the run's end
    action_class: str
    occurrence: int
    rma_at_occurrence: int | None
    fails_at: int | None


@dataclass(frozen=True)
class Truth:
    run: Run
    episodes: tuple[Episode, ...]


@dataclass(frozen=True)
class Change:
    """A GPU's health changed: from ``old`` (the timeline's previous health) to ``new``."""

    time: int
    old: str
    new: str
    action: str
    reason: str


@dataclass(frozen=True)
class Detection:
    time: int
    already: bool  # the GPU was in the state before the window opened
    action: str


class Timeline:
    """One GPU's health over time: healthy until its first change."""

    def __init__(self, changes: Sequence[Change]) -> None:
        self.changes = tuple(changes)
        self._times = [change.time for change in self.changes]

    def detect(self, states: frozenset[str], lo: int, hi: int) -> Detection | None:
        """The first moment in [lo, hi] that the health is one of ``states``."""
        index = bisect.bisect_left(self._times, lo)
        if index and self.changes[index - 1].new in states:
            return Detection(lo, True, self.changes[index - 1].action)
        for change in self.changes[index:]:
            if change.time > hi:
                break
            if change.new in states:
                return Detection(change.time, False, change.action)
        return None

    def onsets(
        self, states: frozenset[str], lo: int | None = None, hi: int | None = None
    ) -> Iterator[Change]:
        """Changes into ``states`` from outside them, optionally only those in [lo, hi]."""
        for change in self.changes:
            within = (lo is None or change.time >= lo) and (hi is None or change.time <= hi)
            if within and change.new in states and change.old not in states:
                yield change


NO_CHANGES = Timeline(())


# -- reading ---------------------------------------------------------------------------------


def truth_from_rows(rows: Iterable[Mapping[str, Any]]) -> Truth:
    """The truth from its JSON Lines rows: the ``run`` row and the ``episode`` rows."""
    run: Run | None = None
    episodes: list[Episode] = []
    for row in rows:
        if row.get("type") == "run":
            run = Run(
                seed=int(row["seed"]),
                nodes=int(row["nodes"]),
                gpus=int(row["gpus"]),
                interval_ns=round(float(row["interval_s"]) * 1e9),
                start=int(row["start_unix_nano"]),
                end=int(row["end_unix_nano"]),
                fault_rate_multiplier=float(row["fault_rate_multiplier"]),
                simulated_gpu_days=float(row["simulated_gpu_days"]),
                equivalent_gpu_days=float(row["equivalent_gpu_days"]),
            )
        elif row.get("type") == "episode":
            episodes.append(
                Episode(
                    id=int(row["id"]),
                    category=row["category"],
                    kind=row["kind"],
                    node_id=row["node_id"],
                    gpu_index=row.get("gpu_index"),
                    serial=row.get("serial") or "",
                    uuid=row.get("uuid") or "",
                    start=int(row["start_unix_nano"]),
                    end=row.get("end_unix_nano"),
                    action_class=row.get("action_class") or "none",
                    occurrence=int(row.get("occurrence") or 1),
                    rma_at_occurrence=row.get("rma_at_occurrence"),
                    fails_at=row.get("fails_at_unix_nano"),
                )
            )
    if run is None:
        raise ValueError("the truth has no run line")
    return Truth(run, tuple(episodes))


def _json_lines(path: Path | str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_truth(path: Path | str) -> Truth:
    """The simulator's ground truth, a JSON Lines file."""
    return truth_from_rows(_json_lines(path))


def load_events(path: Path | str) -> list[dict[str, Any]]:
    """The collector's event log, a JSON Lines file of ``event_row`` dicts."""
    return _json_lines(path)


def event_time_ns(row: Mapping[str, Any]) -> int:
    """An event's time: ``time_unix_nano`` when present, else its ISO ``time`` (milliseconds)."""
    if row.get("time_unix_nano") is not None:
        return int(row["time_unix_nano"])
    moment = datetime.fromisoformat(row["time"])
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def action_class(action: str) -> str:
    """The class of a verdict's action text (the module docstring lists the keywords)."""
    rma, pattern = ACTION_CLASSES[0]
    if pattern.search(action):
        return rma
    found = [
        (match.start(), name) for name, pattern in ACTION_CLASSES[1:] if (match := pattern.search(action))
    ]
    return min(found)[1] if found else "none"


def action_correct(episode: Episode, action: str) -> bool:
    predicted = action_class(action)
    if predicted == episode.action_class:
        return True
    repeat = episode.rma_at_occurrence is not None and episode.occurrence >= episode.rma_at_occurrence
    return episode.action_class == "reboot" and predicted == "rma" and repeat


# -- the fleet: truth cases and verdict timelines, per GPU -------------------------------------


@dataclass(frozen=True)
class Case:
    """An episode on one GPU (a node-wide episode is a case on each of the node's GPUs)."""

    episode: Episode
    gpu: int

    @property
    def key(self) -> Key:
        return (self.episode.node_id, self.gpu)


@dataclass(frozen=True)
class Match:
    case: Case
    detection: Detection | None

    def latency_intervals(self, interval_ns: int) -> float:
        assert self.detection is not None
        return max(self.detection.time - self.case.episode.start, 0) / interval_ns


def _ms_floor(time: int) -> int:
    return time - time % MS_NS


class Fleet:
    """The truth's cases and the verdicts' timelines, indexed by GPU."""

    def __init__(self, truth: Truth, events: Sequence[Mapping[str, Any]]) -> None:
        self.run = truth.run
        self.timelines = _timelines(events)
        self.cases = tuple(_cases(truth, events))
        self._by_gpu: dict[Key, list[Case]] = defaultdict(list)
        for case in self.cases:
            self._by_gpu[case.key].append(case)

    def timeline(self, key: Key) -> Timeline:
        return self.timelines.get(key, NO_CHANGES)

    def category(self, category: str) -> list[Case]:
        return [case for case in self.cases if case.episode.category == category]

    def end(self, episode: Episode) -> int:
        return self.run.end if episode.end is None else episode.end

    def on_gpu(self, key: Key, categories: Iterable[str]) -> list[Episode]:
        wanted = frozenset(categories)
        return [case.episode for case in self._by_gpu.get(key, ()) if case.episode.category in wanted]

    def within(self, key: Key, time: int, categories: Iterable[str]) -> list[Episode]:
        """The episodes of ``categories`` on the GPU whose window [start - I, end + 2 I] holds ``time``."""
        interval = self.run.interval_ns
        return [
            episode
            for episode in self.on_gpu(key, categories)
            if _ms_floor(episode.start - interval) <= time <= self.end(episode) + 2 * interval
        ]

    def match(
        self, cases: Iterable[Case], states: frozenset[str], until: Callable[[Episode], int]
    ) -> list[Match]:
        """Each case with the first moment in [start, until(episode)] that its GPU is in ``states``."""
        return [
            Match(
                case,
                self.timeline(case.key).detect(states, _ms_floor(case.episode.start), until(case.episode)),
            )
            for case in cases
        ]


def _timelines(events: Iterable[Mapping[str, Any]]) -> dict[Key, Timeline]:
    changes = sorted(
        (event_time_ns(row), int(row.get("id") or 0), row)
        for row in events
        if row.get("kind") == kinds.HEALTH_CHANGED
        and row.get("gpu") is not None
        and (row.get("attributes") or {}).get("new")
    )
    per_gpu: dict[Key, list[Change]] = defaultdict(list)
    for time, _, row in changes:
        key = (str(row["node_id"]), int(row["gpu"]))
        old = per_gpu[key][-1].new if per_gpu[key] else HEALTHY
        new = row["attributes"]["new"]
        per_gpu[key].append(Change(time, old, new, row.get("action") or "", row.get("reason") or ""))
    return {key: Timeline(gpu_changes) for key, gpu_changes in per_gpu.items()}


def _cases(truth: Truth, events: Iterable[Mapping[str, Any]]) -> Iterator[Case]:
    per_node = truth.run.gpus // truth.run.nodes if truth.run.nodes else 0
    gpus: dict[str, set[int]] = defaultdict(lambda: set(range(per_node)))
    for episode in truth.episodes:
        gpus[episode.node_id].update(() if episode.gpu_index is None else (episode.gpu_index,))
    for row in events:
        if row.get("gpu") is not None and row.get("node_id") in gpus:
            gpus[row["node_id"]].add(int(row["gpu"]))
    for episode in truth.episodes:
        indices = sorted(gpus[episode.node_id]) if episode.gpu_index is None else [episode.gpu_index]
        yield from (Case(episode, gpu) for gpu in indices)


# -- the score -------------------------------------------------------------------------------


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between the closest ranks (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _per_10k(count: int, gpu_days: float) -> float | None:
    return count / gpu_days * 10_000 if gpu_days > 0 else None


def _iso(time: int) -> str:
    return datetime.fromtimestamp(time / 1e9, timezone.utc).isoformat(timespec="milliseconds")


def _where(case: Case) -> dict[str, Any]:
    return {"episode": case.episode.id, "kind": case.episode.kind, "node_id": case.key[0], "gpu": case.gpu}


def _summary(matches: Sequence[Match], interval_ns: int, on_time_intervals: float) -> dict[str, Any]:
    detected = [match for match in matches if match.detection is not None]
    latencies = [match.latency_intervals(interval_ns) for match in detected]
    on_time = sum(latency <= on_time_intervals for latency in latencies)
    correct = sum(action_correct(m.case.episode, m.detection.action) for m in detected if m.detection)
    return {
        "episodes": len(matches),
        "detected": len(detected),
        "recall": _ratio(len(detected), len(matches)),
        "on_time": on_time,
        "on_time_share": _ratio(on_time, len(matches)),
        "already_detected": sum(bool(m.detection and m.detection.already) for m in detected),
        "latency_p50_intervals": _percentile(latencies, 0.5),
        "latency_p99_intervals": _percentile(latencies, 0.99),
        "action_correct": correct,
        "action_share": _ratio(correct, len(detected)),
    }


def _by_kind(matches: Sequence[Match], interval_ns: int, on_time_intervals: float) -> dict[str, Any]:
    groups: dict[str, list[Match]] = defaultdict(list)
    for match in matches:
        groups[match.case.episode.kind].append(match)
    return {
        "overall": _summary(matches, interval_ns, on_time_intervals),
        "kinds": {kind: _summary(groups[kind], interval_ns, on_time_intervals) for kind in sorted(groups)},
        "missed": [_where(match.case) for match in matches if match.detection is None][:EXAMPLES],
    }


def _hard(fleet: Fleet) -> dict[str, Any]:
    interval = fleet.run.interval_ns
    matches = fleet.match(
        fleet.category("hard"), FAILED, lambda episode: max(fleet.end(episode), episode.start + interval)
    )
    return _by_kind(matches, interval, 1)


def _false_verdicts(fleet: Fleet) -> list[tuple[Key, Change]]:
    """Onsets of degraded or worse that no hard, weak or undetectable episode explains."""
    return [
        (key, change)
        for key, timeline in sorted(fleet.timelines.items())
        for change in timeline.onsets(DEGRADED_OR_WORSE)
        if not fleet.within(key, change.time, EXPLAINING)
    ]


def _weak(fleet: Fleet, false_verdicts: int) -> dict[str, Any]:
    interval = fleet.run.interval_ns
    matches = fleet.match(
        fleet.category("weak"),
        DEGRADED_OR_WORSE,
        # Detected at any time while it lasts (an error rate over an hour takes most of one); the
        # goals' latency is the share within WEAK_INTERVALS and the p99.
        lambda episode: max(fleet.end(episode), episode.start + interval),
    )
    weak = _by_kind(matches, interval, WEAK_INTERVALS)
    for summary in (weak["overall"], *weak["kinds"].values()):
        summary["false_positives"] = false_verdicts
        summary["precision"] = _ratio(summary["detected"], summary["detected"] + false_verdicts)
    return weak


def _episodes_by_kind(fleet: Fleet, category: str, kinds_: Iterable[str] | None = None) -> Counter[str]:
    """Episodes (not cases: a node-wide one counts once) of ``category`` by kind."""
    wanted = None if kinds_ is None else frozenset(kinds_)
    episodes = {case.episode for case in fleet.category(category)}
    return Counter(episode.kind for episode in episodes if wanted is None or episode.kind in wanted)


def _noise(fleet: Fleet, false_verdicts: list[tuple[Key, Change]]) -> dict[str, Any]:
    during: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    outside = 0
    for key, change in false_verdicts:
        noise = sorted({episode.kind for episode in fleet.within(key, change.time, ("noise",))})
        during.update(noise)
        outside += not noise
        if len(examples) < EXAMPLES:
            examples.append(
                {
                    "node_id": key[0],
                    "gpu": key[1],
                    "time": _iso(change.time),
                    "health": change.new,
                    "reason": change.reason,
                    "noise": noise,
                }
            )
    episodes = _episodes_by_kind(fleet, "noise")
    count = len(false_verdicts)
    return {
        "false_verdicts": count,
        "per_10k_simulated_gpu_days": _per_10k(count, fleet.run.simulated_gpu_days),
        "per_10k_equivalent_gpu_days": _per_10k(count, fleet.run.equivalent_gpu_days),
        "outside_noise": outside,
        "kinds": {
            kind: {"episodes": episodes[kind], "false_verdicts": during[kind]}
            for kind in sorted(set(episodes) | set(during))
        },
        "examples": examples,
    }


def _lead_summary(leads: Sequence[float], precursors: int) -> dict[str, Any]:
    return {
        "precursors": precursors,
        "detected": len(leads),
        "recall": _ratio(len(leads), precursors),
        "lead_time_median_hours": _percentile(leads, 0.5),
        "lead_time_p10_hours": _percentile(leads, 0.1),
    }


def _early_warnings(fleet: Fleet) -> dict[str, Any]:
    interval = fleet.run.interval_ns
    warned = frozenset({AT_RISK})

    def opens(episode: Episode) -> int:
        return _ms_floor(episode.start - interval)

    true_onsets = false_onsets = 0
    during: Counter[str] = Counter()
    for key, timeline in fleet.timelines.items():
        for change in timeline.onsets(warned):
            precursors = fleet.on_gpu(key, ("precursor",))
            if any(p.fails_at is not None and opens(p) <= change.time <= p.fails_at for p in precursors):
                true_onsets += 1
            elif not fleet.within(key, change.time, ("hard",)):
                false_onsets += 1
            noise = {e.kind for e in fleet.within(key, change.time, ("noise",))}
            during.update(noise.intersection(PRECURSOR_LIKE_NOISE))
    leads: dict[str, list[float]] = defaultdict(list)
    cases = fleet.category("precursor")
    for case in cases:
        episode = case.episode
        if episode.fails_at is None:
            continue
        first = next(fleet.timeline(case.key).onsets(warned, opens(episode), episode.fails_at), None)
        if first is not None:
            leads[episode.kind].append((episode.fails_at - first.time) / HOUR_NS)
    precursor_kinds = Counter(case.episode.kind for case in cases)
    noise_like = _episodes_by_kind(fleet, "noise", PRECURSOR_LIKE_NOISE)
    return {
        **_lead_summary([lead for kind_leads in leads.values() for lead in kind_leads], len(cases)),
        "true_onsets": true_onsets,
        "false_onsets": false_onsets,
        "precision": _ratio(true_onsets, true_onsets + false_onsets),
        "kinds": {
            kind: _lead_summary(leads[kind], precursor_kinds[kind]) for kind in sorted(precursor_kinds)
        },
        "noise_like": {
            kind: {"episodes": noise_like[kind], "at_risk_onsets": during[kind]}
            for kind in sorted(set(noise_like) | set(during))
        },
    }


def _first_flags(truth: Truth, events: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each serial's first ``rma_due`` event (a flag without a serial is found by its UUID)."""
    serial_of_uuid = {e.uuid: e.serial for e in truth.episodes if e.uuid and e.serial}
    flags: dict[str, Mapping[str, Any]] = {}
    for row in sorted(
        (row for row in events if row.get("kind") == kinds.RMA_DUE),
        key=lambda row: (event_time_ns(row), int(row.get("id") or 0)),
    ):
        attributes = row.get("attributes") or {}
        serial = attributes.get("serial") or serial_of_uuid.get(attributes.get("uuid", ""), "")
        if serial:
            flags.setdefault(serial, row)
    return flags


RMA_OUTCOMES = ("on_time", "early", "late", "missed", "too_soon", "healthy_flagged")


def _due(episodes: Iterable[Episode]) -> Episode | None:
    """The first episode at which an expert sends the GPU for RMA, if any."""
    return next(
        (e for e in episodes if e.rma_at_occurrence is not None and e.occurrence >= e.rma_at_occurrence),
        None,
    )


def _rma_outcome(due: Episode | None, flagged: int | None, interval_ns: int, had_faults: bool) -> str:
    if due is None:
        return "too_soon" if had_faults else "healthy_flagged"
    if flagged is None:
        return "missed"
    if flagged < _ms_floor(due.start):
        return "early"
    return "late" if flagged > due.start + interval_ns else "on_time"


def _rma_row(
    serial: str, episodes: Sequence[Episode], flag: Mapping[str, Any] | None, interval_ns: int
) -> dict[str, Any]:
    """What happened to one serial: its hard episodes (by start) and its first ``rma_due`` flag."""
    due = _due(episodes)
    flagged = None if flag is None else event_time_ns(flag)
    where = flag or {}
    rma_at = [e.rma_at_occurrence for e in ([due] if due else episodes) if e.rma_at_occurrence]
    return {
        "serial": serial,
        "node_id": episodes[0].node_id if episodes else where.get("node_id"),
        "gpu": episodes[0].gpu_index if episodes else where.get("gpu"),
        "expected_occurrence": rma_at[0] if rma_at else None,
        "occurrences": max((e.occurrence for e in episodes), default=0),
        "outcome": _rma_outcome(due, flagged, interval_ns, bool(episodes)),
        "flagged_at": None if flagged is None else _iso(flagged),
        "delay_intervals": None if due is None or flagged is None else (flagged - due.start) / interval_ns,
    }


def _rma(truth: Truth, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    faults: dict[str, list[Episode]] = defaultdict(list)
    for episode in sorted(truth.episodes, key=lambda episode: episode.start):
        if episode.category == "hard" and episode.serial:
            faults[episode.serial].append(episode)
    flags = _first_flags(truth, events)
    serials = [
        _rma_row(serial, faults.get(serial, []), flags.get(serial), truth.run.interval_ns)
        for serial in sorted(set(faults) | set(flags))
        if serial in flags or _due(faults[serial])
    ]
    outcomes = Counter(row["outcome"] for row in serials)
    counts = {name: outcomes[name] for name in RMA_OUTCOMES}
    return {"due": sum(counts[name] for name in RMA_OUTCOMES[:4]), **counts, "serials": serials}


def _undetectable(fleet: Fleet) -> dict[str, Any]:
    interval = fleet.run.interval_ns
    matches = fleet.match(
        fleet.category("undetectable"),
        DEGRADED_OR_WORSE,
        lambda episode: episode.start + WEAK_INTERVALS * interval,
    )
    return {"episodes": len(matches), "detected": sum(m.detection is not None for m in matches)}


def score(truth: Truth, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The verdicts in ``events`` (event_row dicts) scored against ``truth``: JSON-ready."""
    fleet = Fleet(truth, events)
    false_verdicts = _false_verdicts(fleet)
    run = truth.run
    return {
        "run": {
            "seed": run.seed,
            "nodes": run.nodes,
            "gpus": run.gpus,
            "interval_s": run.interval_ns / 1e9,
            "fault_rate_multiplier": run.fault_rate_multiplier,
            "simulated_gpu_days": run.simulated_gpu_days,
            "equivalent_gpu_days": run.equivalent_gpu_days,
        },
        "hard": _hard(fleet),
        "weak": _weak(fleet, len(false_verdicts)),
        "noise": _noise(fleet, false_verdicts),
        "early_warnings": _early_warnings(fleet),
        "rma": _rma(truth, events),
        "undetectable": _undetectable(fleet),
    }


# -- goals -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    """A share as a percentage, truncated (99.96 % must not read as 100 %)."""
    if value is None:
        return "n/a"
    return f"{math.floor(value * 1000 + 1e-9) / 10:.1f}".removesuffix(".0") + " %"


def _intervals(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}"


def _hours(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} h"


def _at_least(label: str, value: float | None, bound: float, text: Callable[[float], str]) -> str:
    """What falls short of ``value >= bound``, or "" when met."""
    if value is None:
        return f"{label} not measured"
    return "" if value >= bound else f"{label} {text(value)}, {text(bound - value)} short"


def _at_most(label: str, value: float | None, bound: float, text: Callable[[float], str]) -> str:
    if value is None:
        return f"{label} not measured"
    return "" if value <= bound else f"{label} {text(value)}, {text(value - bound)} over"


def _goal(name: str, target: str, measured: str, shortfalls: Iterable[str]) -> dict[str, Any]:
    shortfall = "; ".join(text for text in shortfalls if text)
    return {
        "name": name,
        "target": target,
        "measured": measured,
        "met": not shortfall,
        "shortfall": shortfall,
    }


def _unmeasured(name: str, target: str, what: str) -> dict[str, Any]:
    return _goal(name, target, "n/a", [f"not measured: no {what} in this run"])


def _hard_goals(hard: Mapping[str, Any]) -> list[dict[str, Any]]:
    recall, latency = ("Hard faults: recall", "100 %"), ("Hard faults: latency", "p99 <= 1 interval")
    if not hard["episodes"]:
        return [_unmeasured(*recall, "hard faults"), _unmeasured(*latency, "hard faults")]
    p99 = hard["latency_p99_intervals"]
    return [
        _goal(
            *recall,
            f"{_pct(hard['recall'])} ({hard['detected']} of {hard['episodes']})",
            [_at_least("recall", hard["recall"], 1.0, _pct)],
        ),
        _goal(
            *latency,
            f"p99 {_intervals(p99)} intervals; {hard['on_time']} of {hard['episodes']} within one",
            [_at_most("p99", p99, 1.0, _intervals)],
        ),
    ]


def _noise_goal(noise: Mapping[str, Any]) -> dict[str, Any]:
    name, target = "Noise: false degraded-or-worse verdicts", "< 1 per 10,000 GPU-days"
    equivalent, simulated = noise["per_10k_equivalent_gpu_days"], noise["per_10k_simulated_gpu_days"]
    if equivalent is None:
        return _unmeasured(name, target, "GPU-days")
    measured = (
        f"{_rate(equivalent)} per 10,000 equivalent GPU-days ({_rate(simulated)} per 10,000 simulated; "
        f"{noise['false_verdicts']} in all)"
    )
    return _goal(name, target, measured, [] if equivalent < 1 else [f"{_rate(equivalent)}, not under 1"])


def _weak_goal(kind: str, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    name, target = (
        f"Weak faults: {kind}",
        f"recall >= 90 %, precision >= 90 %, p99 <= {WEAK_INTERVALS} intervals",
    )
    if not summary:
        return _unmeasured(name, target, f"{kind} episodes")
    p99 = summary["latency_p99_intervals"]
    return _goal(
        name,
        target,
        f"recall {_pct(summary['recall'])}, precision {_pct(summary['precision'])}, "
        f"p99 {_intervals(p99)} intervals",
        [
            _at_least("recall", summary["recall"], 0.9, _pct),
            _at_least("precision", summary["precision"], 0.9, _pct),
            _at_most("p99", p99, WEAK_INTERVALS, _intervals),
        ],
    )


def _warning_goals(warnings: Mapping[str, Any]) -> list[dict[str, Any]]:
    precision, lead = ("Early warnings: precision", ">= 80 %"), ("Early warnings: lead time", "median >= 1 h")
    onsets = warnings["true_onsets"] + warnings["false_onsets"]
    median = warnings["lead_time_median_hours"]
    return [
        _goal(
            *precision,
            f"{_pct(warnings['precision'])} ({warnings['true_onsets']} true, "
            f"{warnings['false_onsets']} false at-risk onsets)",
            [_at_least("precision", warnings["precision"], 0.8, _pct)],
        )
        if onsets
        else _unmeasured(*precision, "at-risk onsets"),
        _goal(
            *lead,
            f"median {_hours(median)}, p10 {_hours(warnings['lead_time_p10_hours'])} "
            f"({warnings['detected']} of {warnings['precursors']} precursors warned)",
            [_at_least("median", median, 1.0, _hours)],
        )
        if warnings["precursors"]
        else _unmeasured(*lead, "precursors"),
    ]


def _rma_goals(rma: Mapping[str, Any]) -> list[dict[str, Any]]:
    on_time = ("RMA: repeat offenders flagged on time", "all, within 1 interval of the due occurrence")
    wrong = rma["healthy_flagged"] + rma["too_soon"]
    return [
        _goal(
            *on_time,
            f"{rma['on_time']} of {rma['due']} on time; {rma['early']} early, {rma['late']} late, "
            f"{rma['missed']} missed",
            [f"{rma['due'] - rma['on_time']} not on time" if rma["due"] > rma["on_time"] else ""],
        )
        if rma["due"]
        else _unmeasured(*on_time, "repeat offenders"),
        _goal(
            "RMA: no healthy GPU flagged",
            "none (nor one flagged before it is due)",
            f"{rma['healthy_flagged']} healthy, {rma['too_soon']} before due",
            [f"{wrong} flagged wrongly" if wrong else ""],
        ),
    ]


def goals(score: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with its target, what was measured, and the shortfall if missed."""
    return [
        *_hard_goals(score["hard"]["overall"]),
        _noise_goal(score["noise"]),
        *(_weak_goal(kind, score["weak"]["kinds"].get(kind)) for kind in GOAL_WEAK_KINDS),
        *_warning_goals(score["early_warnings"]),
        *_rma_goals(score["rma"]),
    ]


# -- markdown --------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
        "",
    ]


def _latencies(summary: Mapping[str, Any]) -> str:
    return f"{_intervals(summary['latency_p50_intervals'])} / {_intervals(summary['latency_p99_intervals'])}"


def _actions(summary: Mapping[str, Any]) -> str:
    return f"{summary['action_correct']} ({_pct(summary['action_share'])})"


def _detection_rows(
    section: Mapping[str, Any], columns: Callable[[Mapping[str, Any]], list[object]]
) -> list[list[object]]:
    named = [*section["kinds"].items(), ("**all**", section["overall"])]
    return [
        [kind, s["episodes"], s["detected"], _pct(s["recall"]), *columns(s), _latencies(s), _actions(s)]
        for kind, s in named
    ]


def _missed(section: Mapping[str, Any]) -> list[str]:
    if not section["missed"]:
        return []
    cases = ", ".join(
        f"#{m['episode']} {m['kind']} ({m['node_id']} GPU {m['gpu']})" for m in section["missed"]
    )
    return [f"Missed (first {EXAMPLES} at most): {cases}.", ""]


def _hard_markdown(hard: Mapping[str, Any]) -> list[str]:
    return [
        "## Hard faults",
        "",
        *_table(
            [
                "kind",
                "episodes",
                "detected",
                "recall",
                "within 1 interval",
                "latency p50 / p99 (intervals)",
                "action correct",
            ],
            _detection_rows(hard, lambda s: [_pct(s["on_time_share"])]),
        ),
        f"{hard['overall']['already_detected']} counted as detected at latency 0 because the GPU had "
        "already failed when the episode began.",
        "",
        *_missed(hard),
    ]


def _weak_markdown(weak: Mapping[str, Any]) -> list[str]:
    return [
        "## Weak faults",
        "",
        *_table(
            [
                "kind",
                "episodes",
                "detected",
                "recall",
                "precision",
                "latency p50 / p99 (intervals)",
                "action correct",
            ],
            _detection_rows(weak, lambda s: [_pct(s["precision"])]),
        ),
        "Detected: degraded or worse while the episode lasts (latency from its start). Each kind's "
        f"precision is charged with every false verdict ({weak['overall']['false_positives']}, see Noise).",
        "",
        *_missed(weak),
    ]


def _noise_markdown(noise: Mapping[str, Any]) -> list[str]:
    return [
        "## Noise",
        "",
        f"False degraded-or-worse verdicts (onsets no fault explains): {noise['false_verdicts']}, "
        f"{_rate(noise['per_10k_simulated_gpu_days'])} per 10,000 simulated GPU-days, "
        f"{_rate(noise['per_10k_equivalent_gpu_days'])} per 10,000 equivalent GPU-days; "
        f"{noise['outside_noise']} of them outside any noise episode.",
        "",
        *_table(
            ["noise kind", "episodes", "false verdicts during"],
            ([kind, row["episodes"], row["false_verdicts"]] for kind, row in noise["kinds"].items()),
        ),
    ]


def _warnings_markdown(warnings: Mapping[str, Any]) -> list[str]:
    named = [*warnings["kinds"].items(), ("**all**", warnings)]
    return [
        "## Early warnings",
        "",
        f"{warnings['true_onsets']} true and {warnings['false_onsets']} false at-risk onsets: "
        f"precision {_pct(warnings['precision'])}.",
        "",
        *_table(
            ["precursor", "episodes", "warned", "recall", "lead time median", "lead time p10"],
            (
                [
                    kind,
                    s["precursors"],
                    s["detected"],
                    _pct(s["recall"]),
                    _hours(s["lead_time_median_hours"]),
                    _hours(s["lead_time_p10_hours"]),
                ]
                for kind, s in named
            ),
        ),
        *_table(
            ["precursor-like noise", "episodes", "at-risk onsets during"],
            ([kind, row["episodes"], row["at_risk_onsets"]] for kind, row in warnings["noise_like"].items()),
        ),
    ]


def _rma_markdown(rma: Mapping[str, Any]) -> list[str]:
    wrong = [row for row in rma["serials"] if row["outcome"] != "on_time"]
    lines = [
        "## RMA",
        "",
        *_table(
            ["due", "on time", "early", "late", "missed", "flagged too soon", "healthy flagged"],
            [
                [
                    rma[name]
                    for name in ("due", "on_time", "early", "late", "missed", "too_soon", "healthy_flagged")
                ]
            ],
        ),
    ]
    if wrong:
        lines += _table(
            [
                "serial",
                "node",
                "GPU",
                "RMA at occurrence",
                "occurrences",
                "outcome",
                "flag delay (intervals)",
            ],
            (
                [
                    row["serial"],
                    row["node_id"],
                    row["gpu"],
                    row["expected_occurrence"] or "-",
                    row["occurrences"],
                    row["outcome"].replace("_", " "),
                    _intervals(row["delay_intervals"]),
                ]
                for row in wrong
            ),
        )
    return lines


def markdown(score: Mapping[str, Any], goals_: Sequence[Mapping[str, Any]], header: Mapping[str, Any]) -> str:
    """The body of docs/health-score.md: the run, the goals, then each category."""
    undetectable = score["undetectable"]
    lines = [
        *(f"- {key}: " + (f"`{value}`" if key == "command" else f"{value}") for key, value in header.items()),
        "",
        "## Goals",
        "",
        *_table(
            ["goal", "target", "measured", "met"],
            (
                [
                    goal["name"],
                    goal["target"],
                    goal["measured"],
                    "yes" if goal["met"] else f"**no**: {goal['shortfall']}",
                ]
                for goal in goals_
            ),
        ),
        *_hard_markdown(score["hard"]),
        *_weak_markdown(score["weak"]),
        *_noise_markdown(score["noise"]),
        *_warnings_markdown(score["early_warnings"]),
        *_rma_markdown(score["rma"]),
        "## Undetectable",
        "",
        f"{undetectable['episodes']} episodes no telemetry shows (silent data corruption); "
        f"{undetectable['detected']} detected anyway (degraded or worse within {WEAK_INTERVALS} intervals).",
    ]
    return "\n".join(lines) + "\n"
