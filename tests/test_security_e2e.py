"""docs/security.md's mutual-TLS walk-through, as real processes: certs, collector, agent, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpufleet.ports import free_port
from tests.conftest import ROOT, Processes, wait_until

NODE_ID = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


def gpufleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_the_documented_mutual_tls_setup_works(tmp_path: Path, processes: Processes) -> None:
    pki, tokens = tmp_path / "pki", tmp_path / "tokens"
    assert (
        gpufleet(
            "certs", str(pki), "--server-name", "localhost", "--agent", NODE_ID, "--client", "operator"
        ).returncode
        == 0
    )
    assert (
        gpufleet(
            "token",
            "agent",
            "node-fleet",
            "--tokens-file",
            str(tokens),
            "--out",
            str(tmp_path / "agent.token"),
        ).returncode
        == 0
    )
    assert (
        gpufleet(
            "token", "read", "operator", "--tokens-file", str(tokens), "--out", str(tmp_path / "read.token")
        ).returncode
        == 0
    )
    assert (tmp_path / "agent.token").stat().st_mode & 0o077 == 0  # secrets are not world-readable
    grpc_port = free_port()
    processes.collector(
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
        "--bind-node-id-to-cert",
        "--tokens-file",
        str(tokens),
        grpc_port=grpc_port,
        tls_ca=pki / "ca.pem",
    )
    target = f"localhost:{grpc_port}"
    processes.sim_fleet(
        "--node-id",
        NODE_ID,
        "--hostname",
        "secure-node",
        "--interval",
        "0.5",
        "--collector",
        target,
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / f"agent-{NODE_ID}.pem"),
        "--tls-key",
        str(pki / f"agent-{NODE_ID}.key"),
        "--token-file",
        str(tmp_path / "agent.token"),
    )
    client = (
        "--collector",
        target,
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / "client-operator.pem"),
        "--tls-key",
        str(pki / "client-operator.key"),
        "--token-file",
        str(tmp_path / "read.token"),
    )
    wait_until(lambda: "secure-node" in gpufleet("nodes", *client).stdout, timeout=30, what="the secure node")
    without_certificate = gpufleet(
        "nodes",
        "--collector",
        target,
        "--tls-ca",
        str(pki / "ca.pem"),
        "--token-file",
        str(tmp_path / "read.token"),
        "--timeout",
        "3",
    )
    assert without_certificate.returncode == 1 and "Traceback" not in without_certificate.stderr
    wrong_token = gpufleet("nodes", *client[:-2], "--token-file", str(tmp_path / "agent.token"))
    assert wrong_token.returncode == 1 and "may not" in wrong_token.stderr
