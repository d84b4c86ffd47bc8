"""Flags and GPUFLEET_* variables go through the same checks; a bad value stops the program at start."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpufleet.agent.main import build_parser as agent_parser
from gpufleet.cli.main import build_parser as cli_parser
from gpufleet.cli.main import sort_value_attached
from gpufleet.collector.main import BrokerAddress, broker_address
from gpufleet.collector.main import build_parser as collector_parser
from gpufleet.settings import ENV_ATTRIBUTE, unknown_variables, warn_unknown_variables
from tests.conftest import ROOT, environment

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "gpufleet-collector": collector_parser,
    "gpufleet-agent": agent_parser,
    "gpufleet": cli_parser,
}
# Fails every check a typed setting has: numbers, HOST:PORT, files, choices, booleans, KEY=VALUE.
BAD = "not-a-valid-value/!"


def env_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from env_actions(sub)
        elif getattr(action, ENV_ATTRIBUTE, None):
            yield action


def free_text(action: argparse.Action) -> bool:
    """Settings whose every value is valid (names, labels of the topology, paths to create)."""
    return action.type is None and action.choices is None and action.nargs != 0


def settings() -> list[tuple[str, str, bool]]:
    found = {}
    for program, build in PARSERS.items():
        for action in env_actions(build()):
            found[(program, getattr(action, ENV_ATTRIBUTE))] = free_text(action)
    return [(program, env, free) for (program, env), free in sorted(found.items())]


@pytest.mark.parametrize(("program", "env", "free"), settings(), ids=str)
def test_every_environment_variable_is_checked_like_its_flag(
    program: str, env: str, free: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with environment(**{env: BAD}):
        if free:
            PARSERS[program]()  # any text is a valid value of this setting
            return
        with pytest.raises(SystemExit) as exit_info:
            PARSERS[program]()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    flag = "--" + env.removeprefix("GPUFLEET_").lower().replace("_", "-")
    assert len(lines) == 1 and env in lines[0] and flag in lines[0], lines


def test_the_free_text_settings_are_only_these() -> None:
    """A new setting is typed (and so checked), or it is added here on purpose."""
    free = {env for _, env, is_free in settings() if is_free}
    assert free == {
        "GPUFLEET_NODE_ID",
        "GPUFLEET_HOSTNAME",
        "GPUFLEET_DATACENTER",
        "GPUFLEET_CLUSTER",
        "GPUFLEET_RACK",
        "GPUFLEET_SPOOL_DIR",
        "GPUFLEET_KUBELET_SOCKET",
        "GPUFLEET_JOB_MAPPING_DIR",
        "GPUFLEET_SIM_TRUTH_FILE",
        "GPUFLEET_DB",
        "GPUFLEET_COLLECTOR_ID",
        "GPUFLEET_MQTT_USERNAME",
        "GPUFLEET_MQTT_TOPIC_PREFIX",
    }


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("GPUFLEET_METRICS_AUTH", "Token"),
        ("GPUFLEET_METRICS_AUTH", "TOKEN"),
        ("GPUFLEET_METRICS_AUTH", "token "),
        ("GPUFLEET_BIND_NODE_ID_TO_CERT", "enabled"),
        ("GPUFLEET_LOG_LEVEL", "verbose"),
    ],
)
def test_security_settings_fail_closed_at_start(env: str, value: str) -> None:
    """The real program: exit 2, one line, no traceback, never a server without its protection."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpufleet.collector.main",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            ":0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, env: value},
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and env in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("ON", True), ("false", False), ("0", False), ("off", False)],
)
def test_booleans_from_the_environment(value: str, expected: bool) -> None:
    with environment(GPUFLEET_BIND_NODE_ID_TO_CERT=value):
        assert collector_parser().parse_args([]).bind_node_id_to_cert is expected


def test_explicit_flags_win_over_the_environment() -> None:
    with environment(GPUFLEET_INTERVAL="5", GPUFLEET_COLLECTOR="a:1,b:2"):
        assert agent_parser().parse_args(["--interval", "7"]).interval == 7
        assert agent_parser().parse_args([]).collector == ["a:1", "b:2"]


def test_an_unknown_variable_is_a_warning_with_a_suggestion(caplog: pytest.LogCaptureFixture) -> None:
    with environment(GPUFLEET_INTERVALL="5"):
        parser = agent_parser()
        with caplog.at_level(logging.WARNING):
            warn_unknown_variables(parser)
    assert "GPUFLEET_INTERVALL is set but gpufleet-agent has no such setting" in caplog.text
    assert "did you mean GPUFLEET_INTERVAL?" in caplog.text
    with environment(GPUFLEET_INTERVAL="5"):
        assert unknown_variables(agent_parser()) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("broker:1883", BrokerAddress("broker", 1883)),
        ("mqtt://broker", BrokerAddress("broker", 1883)),
        ("mqtt://broker:1884/", BrokerAddress("broker", 1884)),
        ("mqtts://broker", BrokerAddress("broker", 8883, tls=True)),
        ("mqtts://[::1]:8884", BrokerAddress("::1", 8884, tls=True)),
        ("", None),
    ],
)
def test_mqtt_broker_urls(value: str, expected: BrokerAddress | None) -> None:
    assert broker_address(value) == expected


@pytest.mark.parametrize("value", ["http://broker:80", "mqtt://", "mqtt://broker/topic", "broker"])
def test_mqtt_broker_urls_refused_at_start(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        broker_address(value)


def test_sort_descending_as_written() -> None:
    assert sort_value_attached(["gpus", "--idle", "--sort", "-temperature"]) == [
        "gpus",
        "--idle",
        "--sort=-temperature",
    ]
    args = cli_parser().parse_args(sort_value_attached(["gpus", "--sort", "-temperature"]))
    assert args.sort == "-temperature"


@pytest.mark.parametrize("flag", ["--tls-client-ca", "--tls-cert", "--tls-key", "--mqtt-ca-file"])
def test_a_file_that_is_not_pem_is_said_at_start(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a not a PEM file")
    with pytest.raises(SystemExit) as exit_info:
        collector_parser().parse_args([flag, str(not_pem)])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert flag in line and "is not a PEM file" in line and "port" not in line
