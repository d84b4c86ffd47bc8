"""Every `gpufleet ...` command shown in README.md and docs/ runs, as written, against a collector.

Commands come from the fenced blocks and from inline code. Inline spans with placeholders
(`NAME`, `[--flag X]`) or a bare command name are templates and mentions, not commands. The
security walkthrough's commands are run by tests/test_security_e2e.py and `gpufleet demo` by
tests/test_demo.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, Processes, wait_until
from tests.test_fleet_restart import collector_value

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ELSEWHERE = {"docs/security.md": "tests/test_security_e2e.py"}
NOT_HERE = ("demo", "certs", "token", "forget")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:\.venv/bin/)?gpufleet [^`]+)`")
PLACEHOLDER = re.compile(r"\[|\||\b[A-Z]{1,}\b")
NODES = 50


def shown_commands() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for path in DOCS:
        where = str(path.relative_to(ROOT))
        if where in ELSEWHERE:
            continue
        text = path.read_text()
        for block in FENCE.findall(text):
            for line in block.splitlines():
                command = line.split(" #", 1)[0].strip()
                if re.match(r"(\.venv/bin/)?gpufleet ", command):
                    found.setdefault(command, where)
        for span in INLINE.findall(text):
            words = span.split()
            if not PLACEHOLDER.search(span) and len(words) > 2:
                found.setdefault(span, where)
    return sorted((where, command) for command, where in found.items())


COMMANDS = [(where, command) for where, command in shown_commands() if command.split()[1] not in NOT_HERE]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    processes = Processes(tmp_path_factory.mktemp("doc-commands"))
    try:
        _, target, base = processes.collector()
        processes.sim_fleet(
            "--nodes",
            str(NODES),
            "--interval",
            "0.5",
            "--collector",
            target,
            "--faults",
            "healthy",
            "--fault-rate-multiplier",
            "1e6",
            *("--clusters", "2", "--scheduler", "mixed"),
        )
        wait_until(lambda: collector_value(base, "gpufleet_collector_agent_streams") == NODES, timeout=60)
        yield target
    finally:
        processes.stop_all()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 10
    assert ("README.md", ".venv/bin/gpufleet gpus --idle --sort -temperature") in COMMANDS


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_a_command_shown_in_the_docs_runs(fleet: str, where: str, command: str) -> None:
    argv = [sys.executable, "-m", "gpufleet.cli", *shlex.split(command)[1:]]
    env = {**os.environ, "GPUFLEET_COLLECTOR": fleet}
    if "--follow" in argv or "-f" in argv:
        follower = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)
        assert follower.poll() is None, f"{where}: `{command}` ended: {follower.communicate()}"
        follower.terminate()
        follower.wait(timeout=10)
        return
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{where}: `{command}` failed: {result.stderr}"
    assert result.stdout.strip() and not result.stderr, f"{where}: `{command}`: {result.stderr}"
