"""Run promtool (Debian package `prometheus`, installed by `make test`)."""

from __future__ import annotations

import shutil
import subprocess


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError("promtool not found: run the tests with `make test`, which installs prometheus")
    return path


def check_metrics(text: bytes) -> str:
    """promtool's findings about an exposition ('' when there are none)."""
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60)
    findings = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 or findings, "promtool failed without saying why"
    return findings.strip() if result.returncode else ""
