"""`python -m bench` (or `make bench`): the scale benchmark, results in docs/benchmarks.md.

Scenarios at 1,000, 10,000 and 100,000 GPUs against a real collector process,
with the baselines (prometheus_client, the Pushgateway) on the same fleet in the
same run. `--quick` shortens every measurement (about half the time).
`python -m bench soak` instead runs one collector under a steady fleet for a
long time and looks for leaks and pauses (bench/soak.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from bench import harness, report, soak

DEFAULT_OUTPUT = harness.ROOT / "docs" / "benchmarks.md"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer repetitions")
    parser.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="fleet sizes in GPUs, comma-separated (8 GPUs per node)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip prometheus_client and the Pushgateway"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the document to update")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    commands = parser.add_subparsers(dest="command", metavar="{soak}", title="other benchmarks")
    soak_parser = commands.add_parser(
        "soak",
        help="a long run at one fleet size: RSS, descriptors, CPU and pauses over time",
        description=soak.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    soak.add_arguments(soak_parser)
    args = parser.parse_args()
    if args.command == "soak":
        soak.main(args, soak_parser)
        return
    try:
        sizes = tuple(int(size.replace("_", "")) for size in args.sizes.split(","))
    except ValueError:
        parser.error("--sizes takes GPU counts like 1000,10000")
    if any(size < 8 for size in sizes):
        parser.error("each size needs at least 8 GPUs (one node)")
    settings = harness.Settings(quick=args.quick, sizes=sizes, baselines=not args.no_baselines)
    command = "python -m bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    try:
        with harness.terminate_cleanly():
            results = harness.run(settings)
    except harness.Failure as exc:
        sys.exit(f"benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted; every process it started was stopped")
    print(report.text(results))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(results), indent=1, default=str))
    block = report.markdown(results, command)
    if not args.no_write:
        report.write(args.output, block)
        print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
