"""`python -m bench.health`: score the collector's GPU verdicts against a simulated fleet's ground truth.

A real collector process, and a fleet of simulated nodes (bench/health_fleet.py) that fail
as a FleetScenario draws it: hard faults, weak signatures, precursors, repeat offenders and
noise. Time is simulated (one report a simulated minute) and compressed: the fault and
noise rates are multiplied so that ``--hours`` of simulated time hold what ``--days`` would.
The collector's verdict timeline (its health_changed and rma_due events, followed live
over its query API) is scored against the ground truth by bench/health_score.py, which
knows nothing of the health rules. The results go to docs/health-score.md.

    python -m bench.health --gpus 10000 --days 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

import gpufleet
from bench import health_score
from bench.health_fleet import GPUS_PER_NODE, FleetStalled, ScoredFleet
from bench.processes import ROOT, Children, Collector, Failure
from gpufleet import event_kinds
from gpufleet.v1 import query_pb2

DEFAULT_OUTPUT = ROOT / "docs" / "health-score.md"
SCORED_KINDS = (event_kinds.HEALTH_CHANGED, event_kinds.RMA_DUE)
NS = 1_000_000_000
# Simulated time runs hundreds of times faster than the wall clock, so per-second limits on a
# node's reports and events (real time) are lifted: the scorer must see every verdict.
ACCELERATED_TIME = (
    "--reports-per-second",
    "1000000",
    "--report-burst",
    "1000000",
    "--events-per-node-per-second",
    "1000000",
    "--event-burst-per-node",
    "1000000",
)


class EventFollower:
    """Every verdict event the collector logs, followed live from before the first node connects."""

    def __init__(self, collector: Collector) -> None:
        request = query_pb2.StreamEventsRequest(filter=query_pb2.EventFilter(kinds=SCORED_KINDS))
        self._call = collector.query.StreamEvents(request)
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._follow, name="events", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for event in self._call:
                row = event_kinds.event_row(event)
                row["time_unix_nano"] = event.time_unix_nano
                self.events.append(row)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    def settle(self, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Wait until no event has arrived for ``quiet_s`` (the last round's are in)."""
        deadline = time.monotonic() + timeout_s
        count = -1
        while count != len(self.events) and time.monotonic() < deadline:
            count = len(self.events)
            time.sleep(quiet_s)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    nodes = max(args.gpus // GPUS_PER_NODE, 1)
    rounds = int(args.hours * 3600 / args.interval_s)
    multiplier = args.days * 24 / args.hours
    # Simulated time ends now: the collector takes no report from the future.
    start_ns = time.time_ns() - int(rounds * args.interval_s * NS)
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-health-"))
    children = Children(workdir)
    say(
        f"{nodes * GPUS_PER_NODE} GPUs, {args.hours:g} simulated hours standing for {args.days:g} days "
        f"(rates x{multiplier:g}), seed {args.seed}; logs in {workdir}"
    )
    try:
        collector = Collector(children, "collector", db=args.db, extra=ACCELERATED_TIME)
        follower = EventFollower(collector)
        fleet = ScoredFleet(
            collector.target,
            nodes,
            seed=args.seed,
            multiplier=multiplier,
            noise_multiplier=args.noise_multiplier,
            interval_s=args.interval_s,
            rounds=rounds,
            start_ns=start_ns,
        )
        started = time.monotonic()
        step = max(rounds // 10, 1)

        def progress(done: int) -> None:
            if done % step == 0 or done == rounds:
                elapsed = time.monotonic() - started
                say(
                    f"  {done * args.interval_s / 3600:5.1f} of {args.hours:g} simulated hours "
                    f"({done * 100 // rounds} %), {done / elapsed:.1f} rounds/s"
                )

        asyncio.run(fleet.run(progress))
        follower.settle()
        follower.close()
        wall_s = time.monotonic() - started
        truth_path = workdir / "truth.jsonl"
        with truth_path.open("w", encoding="utf-8") as out:
            episodes = fleet.scenario.write_truth(out, fleet.end_ns, {"seed": args.seed})
        if args.truth:
            args.truth.write_bytes(truth_path.read_bytes())
        if args.events:
            args.events.write_text("".join(json.dumps(e) + "\n" for e in follower.events), encoding="utf-8")
        say(
            f"{fleet.reports} reports, {episodes} episodes of ground truth, {len(follower.events)} verdict "
            f"events in {wall_s:.0f} s"
        )
        truth = health_score.load_truth(truth_path)
        score = health_score.score(truth, follower.events)
        goals = health_score.goals(score)
    finally:
        children.stop_everything()
    header = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "gpufleet": gpufleet.__version__,
        "python": platform.python_version(),
        "seed": args.seed,
        "GPUs": nodes * GPUS_PER_NODE,
        "simulated": f"{args.hours:g} h, one report a simulated {args.interval_s:g} s",
        "stands for": f"{args.days:g} days (fault rates x{multiplier:g}, "
        f"background noise x{args.noise_multiplier:g})",
        "run time": f"{wall_s:.0f} s on {platform.machine()} ({len(follower.events)} verdict events)",
        "command": command_line(args),
    }
    return {"header": header, "score": score, "goals": goals}


def command_line(args: argparse.Namespace) -> str:
    return (
        f"python -m bench.health --gpus {args.gpus} --days {args.days:g} --hours {args.hours:g} "
        f"--seed {args.seed}"
        + (f" --noise-multiplier {args.noise_multiplier:g}" if args.noise_multiplier != 1 else "")
    )


def say(message: str) -> None:
    print(message, flush=True)


INTRO = """# The health model, scored

How well gpufleet's verdicts (docs/health.md) match what really happened to a simulated fleet
that fails like a real one: hard faults, faults with weak signatures, precursors, repeat
offenders and noise (docs/health.md, "A fleet that fails like a real one";
`agent/sources/scenario.py` names every assumption). Written by `python -m bench.health` (about
15 minutes for the run below on 2 cores); a small version (64 GPUs, 48 simulated hours) runs in
the test suite and must meet every goal (`tests/test_bench_health.py`).

How it is measured:

- A real `gpufleet-collector` process with its SQLite database, fed by simulated nodes that
  report through the agent's own uplink (real gRPC, acknowledged). Simulated time runs as fast
  as the collector takes reports in; each report stands for a simulated minute and is stamped
  with its simulated time. Repairs (a reboot 30 minutes to 3 hours after a hard fault),
  replacements of GPUs due for RMA and moves of repeat offenders happen as the scenario says.
- Time is compressed: the faults (and their lookalikes) of `--days` happen in `--hours`.
  Background noise runs at its own rate, since compressed it would coincide far more often than
  it does; its false verdicts are counted per simulated GPU-day as well as per equivalent one.
- The verdict timeline is the collector's own `health_changed` and `rma_due` events, followed
  live over its query API and timed by the samples that changed them. The scorer
  (`bench/health_score.py`) does not import the health rules; it reads only the events and the
  ground truth the scenario wrote.
- Latencies are in report intervals. The scored fleet reports once a simulated minute; agents
  report every 10 s by default, so a rule that needs 3 reports answers in 30 s there.

"""


def missed_section(goals: list[dict[str, Any]]) -> str:
    missed = [goal for goal in goals if not goal["met"]]
    if not missed:
        return "\n## Goals missed\n\nNone in this run.\n"
    lines = ["", "## Goals missed", ""]
    lines += [f"- **{goal['name']}**: {goal['shortfall']}" for goal in missed]
    return "\n".join(lines) + "\n"


def write_document(path: Path, result: dict[str, Any]) -> None:
    body = health_score.markdown(result["score"], result["goals"], result["header"])
    path.write_text(INTRO + body.rstrip("\n") + "\n" + missed_section(result["goals"]), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.health",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpus", type=int, default=10_000, help="GPUs in the simulated fleet (8 per node)")
    parser.add_argument("--days", type=float, default=30.0, help="the fleet-days the run stands for")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours actually run")
    parser.add_argument("--interval-s", type=float, default=60.0, help="simulated seconds per report")
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=1.0,
        help="background noise this many times its real rate (it is not compressed with the faults)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the scenario's seed")
    parser.add_argument(
        "--db",
        default=None,
        help="the collector's --db: 'none' keeps it in memory and acknowledges without a commit "
        "(faster; default: a SQLite file, as deployed)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the document to write")
    parser.add_argument("--no-write", action="store_true", help="print the goals only")
    parser.add_argument("--json", type=Path, help="also write the scores to this file")
    parser.add_argument("--truth", type=Path, help="also keep the ground truth (JSON lines) here")
    parser.add_argument("--events", type=Path, help="also keep the verdict events (JSON lines) here")
    args = parser.parse_args(argv)
    # The simulated agents reconnect on purpose (reboots, restarts); only their errors are news.
    logging.getLogger("gpufleet.agent").setLevel(logging.ERROR)
    if args.gpus < GPUS_PER_NODE or args.hours <= 0 or args.days <= 0 or args.interval_s <= 0:
        parser.error("--gpus must be at least 8; --days, --hours and --interval-s must be positive")
    try:
        result = run(args)
    except (Failure, FleetStalled) as exc:
        print(f"python -m bench.health: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m bench.health: interrupted", file=sys.stderr)
        return 130
    for goal in result["goals"]:
        mark = "met   " if goal["met"] else "MISSED"
        say(f"{mark} {goal['name']}: {goal['measured']} (target {goal['target']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    if not args.no_write:
        write_document(args.output, result)
        say(f"wrote {args.output}")
    return 0 if all(goal["met"] for goal in result["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
