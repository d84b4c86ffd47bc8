"""The benchmark's results: checked against the targets, printed, and written to docs/benchmarks.md."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import agent_cost
from bench.harness import Report
from bench.processes import MIB
from bench.procstat import median

BEGIN = "<!-- bench:results:begin (written by `python -m bench`; edits here are overwritten) -->"
END = "<!-- bench:results:end -->"


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def _by_size(report: Report) -> dict[int, dict[str, Any]]:
    return {scenario["gpus"]: scenario for scenario in report.scenarios}


def _ms(seconds: float) -> str:
    return (
        "n/a"
        if math.isnan(seconds)
        else f"{seconds * 1e3:,.0f} ms"
        if seconds >= 0.01
        else f"{seconds * 1e3:.1f} ms"
    )


def _mib(size: float) -> str:
    return f"{size / MIB:,.1f} MiB" if size >= MIB / 10 else f"{size / 1024:,.1f} KiB"


def client_render_s(scenario: dict[str, Any]) -> float:
    baseline = scenario.get("prometheus_client") or {}
    return median(baseline.get("render_cpu_s", []))


def pushgateway_scrape_s(scenario: dict[str, Any], encoding: str) -> float:
    baseline = scenario.get("pushgateway") or {}
    return median(baseline.get(f"scrape_{encoding}_s", []))


def verdicts(report: Report) -> list[Verdict]:
    sizes = _by_size(report)
    out: list[Verdict] = []
    saturated = [s["saturation"] for s in report.scenarios if "saturation" in s]
    if saturated:
        best = max(saturated, key=lambda w: w["reports_per_core_s"])
        out.append(
            Verdict(
                ">= 5,000 reports (8 GPUs) per second per core, rendering included",
                f"{best['reports_per_core_s']:,.0f} per CPU second at {best['reports_per_s']:,.0f} reports/s "
                f"({best['cpu_us_per_report']:.0f} us each)",
                best["reports_per_core_s"] >= 5000,
            )
        )
    ten = sizes.get(10_000)
    if ten and "metrics" in ten:
        plain, gz = ten["metrics"]["plain"], ten["metrics"]["gzip"]
        out.append(
            Verdict("10,000 GPUs: /metrics median <= 50 ms", _ms(plain["p50_s"]), plain["p50_s"] <= 0.05)
        )
        out.append(
            Verdict("10,000 GPUs: /metrics gzip median <= 100 ms", _ms(gz["p50_s"]), gz["p50_s"] <= 0.1)
        )
        client = client_render_s(ten)
        if not math.isnan(client):
            ratio = client / plain["p50_s"]
            out.append(
                Verdict(
                    ">= 50x faster than prometheus_client generate_latest (10,000 GPUs)",
                    f"{ratio:,.0f}x ({_ms(client)} vs {_ms(plain['p50_s'])})",
                    ratio >= 50,
                )
            )
        pg = {enc: pushgateway_scrape_s(ten, enc) for enc in ("plain", "gzip")}
        if not math.isnan(pg["plain"]):
            ratios = {enc: pg[enc] / ten["metrics"][enc]["p50_s"] for enc in pg}
            out.append(
                Verdict(
                    ">= 20x faster than the Pushgateway (10,000 GPUs)",
                    f"{ratios['plain']:,.0f}x plain, {ratios['gzip']:,.0f}x gzip",
                    min(ratios.values()) >= 20,
                )
            )
    big = sizes.get(100_000)
    if big:
        ingest = big["ingest"]
        out.append(
            Verdict(
                "100,000 GPUs, 10 s interval: ingest <= 0.5 core",
                f"{ingest['cores']:.2f} cores at {ingest['reports_per_s']:,.0f} reports/s",
                ingest["cores"] <= 0.5,
            )
        )
        if "shards" in big:
            shards = big["shards"]
            worst_bytes = max(shards[enc]["max_bytes"] for enc in ("plain", "gzip"))
            worst_s = max(shards[enc]["p99_s"] for enc in ("plain", "gzip"))
            out.append(
                Verdict(
                    f"100,000 GPUs: each of {shards['shards']} shards < 16 MiB and < 100 ms",
                    f"largest {_mib(worst_bytes)}; p99 {_ms(worst_s)} "
                    f"(median {_ms(shards['plain']['p50_s'])} plain, {_ms(shards['gzip']['p50_s'])} gzip)",
                    worst_bytes < 16 * MIB and worst_s < 0.1,
                )
            )
        fleet_view = big["fleet_view"]
        out.append(
            Verdict(
                "100,000 GPUs: /metrics/fleet small and fast",
                f"{_mib(fleet_view['bytes'])}, median {_ms(fleet_view['p50_s'])}",
                fleet_view["bytes"] < 100_000 and fleet_view["p99_s"] < 0.1,
            )
        )
    for gpus, limit in ((10_000, 250e6), (100_000, 2e9)):
        scenario = sizes.get(gpus)
        if scenario:
            peak = scenario["collector_memory"]["hwm"]
            out.append(
                Verdict(
                    f"{gpus:,} GPUs: collector RSS <= {limit / 1e6:,.0f} MB",
                    f"{peak / 1e6:,.0f} MB peak",
                    peak <= limit,
                )
            )
    fresh = [(s["gpus"], s["freshness"]) for s in report.scenarios]
    if fresh:
        worst = max(max(f["metrics"]["p99_s"], f["query"]["p99_s"]) for _, f in fresh)
        out.append(
            Verdict(
                "freshness p99 <= 1 s in /metrics and the query API (CLI), under load",
                ", ".join(
                    f"{g:,}: {_ms(f['metrics']['p99_s'])} / {_ms(f['query']['p99_s'])}" for g, f in fresh
                ),
                worst <= 1.0,
            )
        )
    if big:
        query = big["query"]
        out.append(
            Verdict(
                "100,000 GPUs: fleet summary < 200 ms (query API)",
                f"median {_ms(query['summary_p50_s'])}, p99 {_ms(query['summary_p99_s'])} "
                f"(CLI process, Python start-up included: {query['cli_summary_s']:.2f} s)",
                query["summary_p99_s"] < 0.2,
            )
        )
        out.append(
            Verdict(
                "100,000 GPUs: page through all GPUs without timeouts",
                f"{query['gpus_paged']:,} GPUs in {query['pages']} pages, {query['paging_s']:.1f} s, "
                f"slowest page {_ms(query['page_max_s'])}, {query['page_errors']} errors",
                query["page_errors"] == 0 and query["gpus_paged"] >= big["gpus"],
            )
        )
    if report.guest:
        guest = report.guest
        out.append(
            Verdict(
                "agent (8 GPUs, default interval): <= 1 % of a core and <= 60 MB RSS",
                f"{guest['core_percent']:.2f} % of a core, {guest['rss_bytes'] / 1e6:.0f} MB",
                guest["core_percent"] <= 1.0 and guest["rss_bytes"] <= 60e6,
            )
        )
    if report.gpm:
        gpm = report.gpm
        out.append(
            Verdict(
                "agent: NVML GPM sampling <= 1 ms of CPU per GPU per interval (fake NVML)",
                f"{gpm['gpm_us']:.0f} us per GPU ({gpm['mig7_gpm_us']:.0f} us with 7 MIG instances each), "
                f"the fake NVML's own share included",
                gpm["gpm_us"] <= agent_cost.TARGET_US and gpm["mig7_gpm_us"] <= agent_cost.TARGET_US,
            )
        )
    return out


def markdown(report: Report, command: str) -> str:
    env = report.environment
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.started))
    lines = [
        BEGIN,
        "",
        f"Run on {when} with `{command}`"
        + (" (quick: shorter windows, fewer repetitions)." if report.settings.quick else "."),
        "",
        f"- machine: {env['cpu']}, {env['cores']} cores, {env['memory']}; {env['os']}, Linux {env['kernel']}",
        f"- Python {env['python']}, grpcio {env['grpcio']}, protobuf {env['protobuf']} "
        f"(backend: **{env['protobuf_backend']}**), prometheus_client {env['prometheus_client']}, "
        f"Pushgateway: {env['pushgateway']}",
        "- the collector is the real `gpufleet-collector` process with its SQLite database; CPU "
        "seconds and RSS are its own, from /proc",
        "- load average of the machine (other work shares it) before the run: "
        f"{env.get('load_average_before', '?')}; after each size: "
        + ", ".join(f"{s['gpus']:,}: {s.get('load_average_after', '?')}" for s in report.scenarios),
        *[f"- {note}" for note in report.notes],
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for verdict in verdicts(report):
        met = {True: "yes", False: "**no**", None: "n/a"}[verdict.met]
        lines.append(f"| {verdict.target} | {verdict.measured} | {met} |")
    lines += [
        "",
        "### Ingest (collector process)",
        "",
        "| GPUs | load | reports/s | collector cores | CPU per report | reports per CPU second "
        "| load generator cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in report.scenarios:
        for key, label in (
            ("ingest", "every node every 10 s"),
            ("saturation", "4 reports per node per second"),
        ):
            w = scenario.get(key)
            if w:
                lines.append(
                    f"| {scenario['gpus']:,} | {label} | {w['reports_per_s']:,.0f} | {w['cores']:.3f} | "
                    f"{w['cpu_us_per_report']:.0f} us | {w['reports_per_core_s']:,.0f} | "
                    f"{w['load_generator_cores']:.2f} |"
                )
    for scenario in report.scenarios:
        floor = scenario.get("grpc_floor")
        if floor:
            lines.append(
                f"| {scenario['gpus']:,} | the same, against a server that only parses and acknowledges "
                f"(gRPC alone) | {floor['reports_per_s']:,.0f} | {floor['cores']:.3f} | "
                f"{floor['cpu_us_per_report']:.0f} us | {1e6 / floor['cpu_us_per_report']:,.0f} | |"
            )
        comparison = scenario.get("replay_vs_simulator")
        if comparison:
            for key, label in (
                ("replayed", "load generator, every node every 1 s"),
                ("simulated", "real agents (`--source sim`), every node every 1 s"),
            ):
                w = comparison[key]
                lines.append(
                    f"| {scenario['gpus']:,} | {label} | {w['reports_per_s']:,.0f} | {w['cores']:.3f} | "
                    f"{w['cpu_us_per_report']:.0f} us | {w['reports_per_core_s']:,.0f} | "
                    f"{w['load_generator_cores']:.2f} |"
                )
    lines += [
        "",
        "### Scrapes of every per-GPU series",
        "",
        "Each scrape follows a round in which every node reported (every node changed since the "
        "scrape before, as with a 15 s scrape interval); *repeated* scrapes follow each other at once "
        "(a second Prometheus of an HA pair). Latency is to the last byte, on the client (Python's "
        "http.client); CPU is the collector's per scrape, less what the steady ingest used meanwhile.",
        "",
        "| GPUs | path | encoding | median | p99 | repeated median | collector CPU | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario in report.scenarios:
        metrics = scenario.get("metrics")
        if metrics:
            for encoding in ("plain", "gzip"):
                s, r = metrics[encoding], metrics[f"{encoding}_repeated"]
                lines.append(
                    f"| {scenario['gpus']:,} | /metrics | {encoding} | {_ms(s['p50_s'])} | "
                    f"{_ms(s['p99_s'])} | {_ms(r['p50_s'])} | {_ms(s['cpu_s'])} | {_mib(s['bytes'])} |"
                )
        shards = scenario.get("shards")
        if shards:
            for encoding in ("plain", "gzip"):
                s = shards[encoding]
                lines.append(
                    f"| {scenario['gpus']:,} | /metrics/nodes, {shards['shards']} shards | {encoding} | "
                    f"{_ms(s['p50_s'])} | {_ms(s['p99_s'])} (max {_ms(s['max_s'])}) | | {_ms(s['cpu_s'])} | "
                    f"largest {_mib(s['max_bytes'])} |"
                )
            whole = scenario.get("metrics_whole_bytes")
            if whole:
                lines.append(
                    f"| {scenario['gpus']:,} | /metrics (all of it; size only) | plain | | | | "
                    f"| {_mib(whole)} |"
                )
        fleet_view = scenario["fleet_view"]
        lines.append(
            f"| {scenario['gpus']:,} | /metrics/fleet | plain | {_ms(fleet_view['p50_s'])} | "
            f"{_ms(fleet_view['p99_s'])} | | {_ms(fleet_view['cpu_s'])} | {_mib(fleet_view['bytes'])} |"
        )
    lines += _baseline_lines(report)
    lines += [
        "",
        "### Freshness, query API, memory",
        "",
        "Freshness: a probe node sends a report with a marker and polls its /metrics shard and the "
        "query API (what the CLI calls) until the marker shows, while the fleet reports.",
        "",
        "| GPUs | acked p50 | /metrics p50 / p99 | query API p50 / p99 | summary p50 / p99 | all GPUs paged "
        "| CLI `summary` | collector RSS (peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario in report.scenarios:
        f, q, m = scenario["freshness"], scenario["query"], scenario["collector_memory"]
        lines.append(
            f"| {scenario['gpus']:,} | {_ms(f['acked']['p50_s'])} | {_ms(f['metrics']['p50_s'])} / "
            f"{_ms(f['metrics']['p99_s'])} | {_ms(f['query']['p50_s'])} / {_ms(f['query']['p99_s'])} | "
            f"{_ms(q['summary_p50_s'])} / {_ms(q['summary_p99_s'])} | "
            f"{q['gpus_paged']:,} in {q['paging_s']:.1f} s "
            f"({q['pages']} pages, {q['page_errors']} errors) | {q['cli_summary_s']:.2f} s | "
            f"{m['rss'] / 1e6:,.0f} MB ({m['hwm'] / 1e6:,.0f} MB) |"
        )
    if report.guest:
        g = report.guest
        lines += [
            "",
            f"Agent as a guest (`gpufleet-agent --source sim`, 8 GPUs, default 10 s interval, measured over "
            f"{g['seconds']:.0f} s after a {15:.0f} s warm-up): **{g['core_percent']:.2f} % of one core**, "
            f"**{g['rss_bytes'] / 1e6:.0f} MB** peak RSS.",
        ]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _baseline_lines(report: Report) -> list[str]:
    rows = []
    for scenario in report.scenarios:
        gpus = scenario["gpus"]
        ours = scenario.get("metrics")
        client = scenario.get("prometheus_client")
        if client and ours:
            render = median(client["render_cpu_s"])
            rows.append(
                f"| {gpus:,} | prometheus_client `generate_latest` ({client['series']:,} series) | "
                f"{_ms(render)} | {_ms(render)} | {_mib(client['bytes'])} | "
                f"{client['rss_bytes'] / 1e6:,.0f} MB | {render / ours['plain']['p50_s']:,.0f}x | "
                f"update of every series: {client['update_cpu_s']:.2f} s |"
            )
        pg = scenario.get("pushgateway")
        if pg and "skipped" in pg:
            rows.append(f"| {gpus:,} | Pushgateway | skipped: {pg['skipped']} | | | | | |")
        elif pg and ours:
            for encoding in ("plain", "gzip"):
                latency = median(pg[f"scrape_{encoding}_s"])
                cpu = median(pg[f"scrape_{encoding}_cpu_s"])
                rows.append(
                    f"| {gpus:,} | Pushgateway, scrape ({encoding}) | {_ms(latency)} | {_ms(cpu)} | "
                    f"{_mib(pg[f'scrape_{encoding}_bytes'])} | {pg['rss_bytes'] / 1e6:,.0f} MB | "
                    f"{latency / ours[encoding]['p50_s']:,.0f}x | |"
                )
            checked_rate = (
                pg["checked_pushes"] / pg["checked_push_s"] if pg["checked_push_s"] else float("nan")
            )
            rows.append(
                f"| {gpus:,} | Pushgateway, push of every node | {pg['push_round_s']:.1f} s | "
                f"{pg['push_round_cpu_s']:.1f} s | | | | without the consistency check (8 clients); with it: "
                f"{checked_rate:,.1f} pushes/s, a round of {pg['groups']:,} nodes would take "
                f"{pg['groups'] / checked_rate:,.0f} s |"
            )
    if not rows:
        return []
    return [
        "",
        "### Baselines on the same fleet, same run",
        "",
        "The same series (names, labels, values) as the collector's /metrics/nodes. *x slower* compares "
        "with the collector's median scrape of the same encoding after every node changed.",
        "",
        "| GPUs | system | time | CPU | bytes | RSS | x slower | notes |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def text(report: Report) -> str:
    lines = ["", "targets:"]
    for verdict in verdicts(report):
        met = {True: "met", False: "NOT MET", None: "n/a"}[verdict.met]
        lines.append(f"  [{met:>7}] {verdict.target}: {verdict.measured}")
    return "\n".join(lines)


def write(path: Path, block: str) -> None:
    """Put the results block into the document, in place of the previous one."""
    document = path.read_text() if path.exists() else "# Benchmarks\n\n## Results\n\n"
    pattern = re.compile(
        re.escape(BEGIN.split(" (", maxsplit=1)[0]) + r".*?" + re.escape(END) + r"\n?", re.DOTALL
    )
    if pattern.search(document):
        document = pattern.sub(lambda _: block, document, count=1)
    else:
        document = document.rstrip("\n") + "\n\n" + block
    path.write_text(document)
