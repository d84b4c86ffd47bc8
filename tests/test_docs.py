"""The reference docs list what the code has: metrics, event kinds, XID rules, flags."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gpufleet import event_kinds as kinds
from gpufleet.collector.health import XID_RULES
from gpufleet.collector.selfmetrics import CollectorMetrics
from tests.conftest import ROOT


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def test_collector_metrics_are_documented() -> None:
    documented = doc("metrics.md")
    names = set()
    for family in text_string_to_metric_families(CollectorMetrics().render().decode()):
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    missing = sorted(name for name in names if f"`{name}`" not in documented)
    assert not missing, f"add to docs/metrics.md: {missing}"


def test_event_kinds_are_documented() -> None:
    documented = doc("events.md")
    missing = [kind for kind in kinds.ALL_KINDS if f"`{kind}`" not in documented]
    assert not missing, f"add to docs/events.md: {missing}"


def test_every_xid_rule_is_documented() -> None:
    documented = doc("health.md")
    for code, rule in XID_RULES.items():
        assert rule.meaning in documented, f"XID {code} missing from docs/health.md"
