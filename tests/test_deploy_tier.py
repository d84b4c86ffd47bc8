"""A tier of collectors: deploy/kubernetes/tier and deploy/systemd/collector-tier.env.

Checked as tests/test_deploy_files.py checks the single collector's files: the Kubernetes objects
follow the API schemas, every GPUFLEET_* setting goes through the programs' own parsers (with what
the cluster fills in: the pod's name and IP, the Secret's URL), names and ports agree, and the
files the tier copies from deploy/kubernetes stay equal to them. The environment file runs for
real: collectors started with its settings on a private PostgreSQL form a tier.
"""

from __future__ import annotations

import ipaddress
import random
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gpufleet.collector.store_postgres import is_postgres_url
from gpufleet.ports import free_port
from tests.conftest import Processes, environment, http_get, wait_until
from tests.postgres_server import PostgresServer
from tests.test_deploy_files import (
    DEPLOY,
    IMAGE,
    collector_ports,
    commented_examples,
    env_file,
    env_names,
    parse,
    unit_settings,
    venv_tool,
    yaml_file,
)

BASE = DEPLOY / "kubernetes"
TIER = BASE / "tier"
TIER_ENV = DEPLOY / "systemd" / "collector-tier.env"
# The Prometheus Operator's kinds: not in the Kubernetes API schemas.
OPERATOR = {"servicemonitor.yaml", "prometheusrule.yaml"}

# What the cluster fills in for the parsers: a member's pod name and IP, the Secret's URL.
POD_NAME = "gpufleet-collector-0"
POD_IP = "10.0.0.7"
NODE_NAME = "gpu-node-1"
SECRET_URL = "postgresql://gpufleet:secret@postgresql.example:5432/gpufleet"
SECRETS = {("gpufleet-postgresql", "url"): SECRET_URL}
FIELDS = {"metadata.name": POD_NAME, "status.podIP": POD_IP, "spec.nodeName": NODE_NAME}


def documents(directory: Path) -> list[dict[str, Any]]:
    """The objects in a kustomization's resources (files, in both of ours)."""
    resources = yaml_file(directory / "kustomization.yaml")["resources"]
    return [
        doc for resource in resources for doc in yaml.safe_load_all((directory / resource).read_text()) if doc
    ]


def objects(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents(directory) if doc["kind"] == kind]


def only(directory: Path, kind: str) -> dict[str, Any]:
    (doc,) = objects(directory, kind)
    return doc


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (one,) = workload["spec"]["template"]["spec"]["containers"]
    return one  # type: ignore[no-any-return]


def headless_service() -> dict[str, Any]:
    (service,) = [s for s in objects(TIER, "Service") if s["spec"].get("clusterIP") == "None"]
    return service


def cli_service() -> dict[str, Any]:
    (service,) = [s for s in objects(TIER, "Service") if s["spec"].get("clusterIP") != "None"]
    return service


def pod_env(item_list: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment as the kubelet makes it: fields and Secrets filled in, and
    $(VAR) replaced by the value of a variable defined before it (else left as it is)."""
    values: dict[str, str] = {}
    for item in item_list:
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), item["value"])
        elif "fieldRef" in item["valueFrom"]:
            value = FIELDS[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = SECRETS[(ref["name"], ref["key"])]
        values[item["name"]] = value
    return values


def settings(one: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in pod_env(one.get("env", [])).items() if k.startswith("GPUFLEET_")}


def seconds(duration: str) -> float:
    """A Prometheus duration of seconds or minutes (15s, 1m)."""
    match = re.fullmatch(r"(\d+)([sm])", duration)
    assert match, duration
    return float(match[1]) * (60 if match[2] == "m" else 1)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# -- Kubernetes ------------------------------------------------------------------------------


def test_the_tier_kustomization_lists_its_files_and_they_parse() -> None:
    kustomization = yaml_file(TIER / "kustomization.yaml")
    resources = kustomization["resources"]
    for resource in resources:
        assert (TIER / resource).is_file(), resource
    # Nothing in the directory that the kustomization leaves out.
    assert {path.name for path in TIER.iterdir()} == {"kustomization.yaml", *resources}
    docs = documents(TIER)
    assert sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs) == [
        ("DaemonSet", "gpufleet-agent"),
        ("Namespace", "gpufleet"),
        ("PodDisruptionBudget", "gpufleet-collector"),
        ("PrometheusRule", "gpufleet"),
        ("Service", "gpufleet-collector"),
        ("Service", "gpufleet-collectors"),
        ("ServiceMonitor", "gpufleet-collector"),
        ("StatefulSet", "gpufleet-collector"),
    ]
    assert {doc["metadata"].get("namespace", doc["metadata"]["name"]) for doc in docs} == {"gpufleet"}
    assert kustomization["images"] == yaml_file(BASE / "kustomization.yaml")["images"]
    (image,) = kustomization["images"]
    assert f"{image['newName']}:{image['newTag']}" == IMAGE
    for kind in ("StatefulSet", "DaemonSet"):
        assert container(only(TIER, kind))["image"] == IMAGE


def test_kustomize_can_build_the_tier_from_its_own_folder() -> None:
    """kustomize refuses a resource outside the kustomization's folder, and a cycle: none here."""
    for resource in yaml_file(TIER / "kustomization.yaml")["resources"]:
        path = (TIER / resource).resolve()
        assert path.parent == TIER.resolve() and path.is_file() and not path.is_symlink(), resource


def test_the_tier_objects_follow_the_kubernetes_api_schemas() -> None:
    """Strict: an unknown or misspelt field fails."""
    resources = yaml_file(TIER / "kustomization.yaml")["resources"]
    assert set(resources) >= OPERATOR
    files = [str(TIER / resource) for resource in resources if resource not in OPERATOR]
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.30.0", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output
    assert set(re.findall(r"passed for resource (\S+)", output)) == {
        "namespace/gpufleet",
        "statefulset/gpufleet-collector",
        "service/gpufleet-collectors",
        "service/gpufleet-collector",
        "poddisruptionbudget/gpufleet-collector",
        "daemonset/gpufleet-agent",
    }


def test_every_member_runs_with_settings_the_collector_accepts_named_and_advertised_by_its_pod() -> None:
    statefulset = only(TIER, "StatefulSet")
    member = container(statefulset)
    assert member["command"] == ["gpufleet-collector"]
    args = parse("gpufleet-collector", member.get("args", []), settings(member))
    grpc_port, http_port = collector_ports(settings(member))
    assert {p["name"]: p["containerPort"] for p in member["ports"]} == {"grpc": grpc_port, "http": http_port}
    # The database from the Secret, the name from the pod, the address agents dial from the pod.
    assert is_postgres_url(args.db) and args.db == SECRET_URL
    assert args.collector_id == POD_NAME
    assert args.advertise == f"{POD_IP}:{grpc_port}"
    assert args.workers == 1  # a pod is one member
    # No other member serves a dead one's nodes before its series are gone (its first failed scrape).
    intervals = [seconds(e["interval"]) for e in only(TIER, "ServiceMonitor")["spec"]["endpoints"]]
    assert args.lease_seconds >= 1.25 * max(intervals)
    env = {item["name"]: item for item in member["env"]}
    assert env["GPUFLEET_DB"]["valueFrom"] == {"secretKeyRef": {"name": "gpufleet-postgresql", "key": "url"}}
    # The kustomization says how to make that Secret; the tier ships no password.
    text = (TIER / "kustomization.yaml").read_text()
    assert "kubectl create secret generic gpufleet-postgresql -n gpufleet" in text
    assert "--from-literal=url=postgresql://" in text
    assert not objects(TIER, "Secret")
    assert env["GPUFLEET_COLLECTOR_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    names = [item["name"] for item in member["env"]]
    # The kubelet expands $(POD_IP) only from a variable defined before.
    assert names.index("POD_IP") < names.index("GPUFLEET_ADVERTISE")
    assert env["GPUFLEET_ADVERTISE"]["value"] == f"$(POD_IP):{grpc_port}"
    # The state is in PostgreSQL: no volume.
    assert "volumes" not in statefulset["spec"]["template"]["spec"] and "volumeMounts" not in member


def test_the_statefulset_runs_three_members_at_once_behind_the_headless_service() -> None:
    spec = only(TIER, "StatefulSet")["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], pod_labels)
    service = headless_service()
    assert spec["serviceName"] == service["metadata"]["name"] == "gpufleet-collectors"
    assert selects(service["spec"]["selector"], pod_labels)
    member = container(only(TIER, "StatefulSet"))
    grpc_port, http_port = collector_ports(settings(member))
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"grpc": (grpc_port, "grpc"), "http": (http_port, "http")}
    budget = only(TIER, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and selects(budget["selector"]["matchLabels"], pod_labels)


def test_the_members_keep_the_single_collectors_security_probes_and_resources() -> None:
    deployment = only(BASE, "Deployment")
    pod, base_pod = only(TIER, "StatefulSet")["spec"]["template"], deployment["spec"]["template"]
    assert pod["metadata"]["labels"] == base_pod["metadata"]["labels"]
    for key in ("securityContext", "automountServiceAccountToken", "terminationGracePeriodSeconds"):
        assert pod["spec"][key] == base_pod["spec"][key], key
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    member, single = container(only(TIER, "StatefulSet")), container(deployment)
    for key in ("name", "image", "command", "ports", "readinessProbe", "livenessProbe", "resources"):
        assert member[key] == single[key], key
    assert (
        member["securityContext"]
        == single["securityContext"]
        == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
    )
    assert (member["readinessProbe"]["httpGet"]["path"], member["livenessProbe"]["httpGet"]["path"]) == (
        "/readyz",
        "/healthz",
    )


def test_the_agents_dial_every_member_through_the_headless_service() -> None:
    agent = container(only(TIER, "DaemonSet"))
    args = parse("gpufleet-agent", agent.get("args", []), settings(agent))
    service = headless_service()
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert args.collector == [f"{name}.{namespace}.svc:{grpc_port}"]
    assert args.collector == ["gpufleet-collectors.gpufleet.svc:50051"]
    # Otherwise the agent of deploy/kubernetes, unchanged.
    base = only(BASE, "DaemonSet")
    for item in container(base)["env"]:
        if item["name"] == "GPUFLEET_COLLECTOR":
            item["value"] = args.collector[0]
    assert only(TIER, "DaemonSet") == base


def test_prometheus_scrapes_every_member_once_through_the_headless_service() -> None:
    monitor = only(TIER, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    # Not the CLI Service too, whose endpoints are the same pods: each series would come twice.
    chosen = [
        s["metadata"]["name"] for s in objects(TIER, "Service") if selects(selector, s["metadata"]["labels"])
    ]
    assert chosen == [headless_service()["metadata"]["name"]]
    ports = {p["name"] for p in headless_service()["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= ports
    # The base's endpoints, relabelings included: the operator's namespace, pod and container
    # target labels would rename the collector's workload labels to exported_*.
    assert monitor["spec"]["endpoints"] == only(BASE, "ServiceMonitor")["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        dropped = [r["regex"] for r in endpoint["relabelings"] if r.get("action") == "labeldrop"]
        for label in ("namespace", "pod", "container"):
            assert any(re.fullmatch(regex, label) for regex in dropped), (endpoint["path"], label)
    assert monitor["metadata"] == only(BASE, "ServiceMonitor")["metadata"]


def test_the_cli_service_is_the_base_service_in_front_of_the_members() -> None:
    service = cli_service()
    assert service == only(BASE, "Service")
    pod_labels = only(TIER, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)


def test_the_files_the_tier_copies_equal_the_base() -> None:
    """kustomize loads no file from outside the kustomization's directory: the tier has copies."""
    for kind in ("Namespace", "PrometheusRule"):
        assert only(TIER, kind) == only(BASE, kind), f"copy deploy/kubernetes/{kind.lower()}.yaml to tier/"


# -- systemd ---------------------------------------------------------------------------------


def test_the_tier_environment_file_holds_settings_the_collector_accepts() -> None:
    env = env_file(TIER_ENV)
    examples = commented_examples(TIER_ENV)
    assert {"GPUFLEET_DB", "GPUFLEET_COLLECTOR_ID"} <= set(env)
    assert {"GPUFLEET_ADVERTISE", "GPUFLEET_WORKERS", "GPUFLEET_LEASE_SECONDS"} <= set(examples)
    unknown = sorted(set(examples) - env_names("gpufleet-collector"))
    assert not unknown, f"gpufleet-collector has no flags for {unknown}"
    args = parse("gpufleet-collector", [], env)
    assert is_postgres_url(args.db) and args.collector_id and args.workers == 1
    # The single collector's settings, its ports included, but for the database.
    single = env_file(DEPLOY / "systemd" / "collector.env")
    assert {key: single[key] for key in single if key != "GPUFLEET_DB"}.items() <= env.items()
    assert collector_ports(env) == collector_ports(single) == (50051, 9490)
    # The commented examples are values it takes, too: an IP address and the gRPC port to advertise.
    args = parse("gpufleet-collector", [], {**env, **examples})
    host, port = args.advertise.rsplit(":", 1)
    ipaddress.ip_address(host)
    assert int(port) == collector_ports(env)[0]
    assert args.workers > 1
    scrape = yaml_file(DEPLOY / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    assert args.lease_seconds >= 1.25 * seconds(scrape)


def test_the_tier_environment_file_takes_the_place_the_unit_reads() -> None:
    (path,) = unit_settings(DEPLOY / "systemd" / "gpufleet-collector.service")["EnvironmentFile"]
    path = path.lstrip("-")
    assert path == "/etc/gpufleet/collector.env"
    text = TIER_ENV.read_text()
    assert text.startswith(f"# {path} ")
    # It holds the database's password: installed readable by root only.
    assert f"install -D -m 0600 {TIER_ENV.name} {path}\n" in text


def member_env(dsn: str, collector_id: str, grpc_port: int, http_port: int, **more: str) -> dict[str, str]:
    """collector-tier.env with what differs on this machine: the database, ports and name."""
    env, examples = env_file(TIER_ENV), commented_examples(TIER_ENV)
    changes = {
        "GPUFLEET_DB": dsn,
        "GPUFLEET_COLLECTOR_ID": collector_id,
        "GPUFLEET_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "GPUFLEET_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        **more,
    }
    for key in changes:
        assert key in env or key in examples, f"{key} is not in {TIER_ENV.name}"
    return {**env, **changes}


def start_member(processes: Processes, env: dict[str, str]) -> str:
    """Start a collector configured by ``env`` alone, as systemd would; return its base URL."""
    with environment(**env):
        processes.start("gpufleet.collector.main", name=env["GPUFLEET_COLLECTOR_ID"])
    return f"http://{env['GPUFLEET_HTTP_LISTEN']}"


def answers(base: str) -> bool:
    return all(http_get(f"{base}{path}", timeout=1)[0] == 200 for path in ("/readyz", "/healthz"))


def wait_answering(processes: Processes, base: str) -> None:
    """Wait for /readyz and /healthz (the probes' paths); on a timeout, say what the collectors logged."""
    try:
        wait_until(lambda: answers(base), what=f"{base} ready")
    except AssertionError as exc:
        logs = "\n".join(processes.log(process)[-3000:] for process in processes.started)
        raise AssertionError(f"{exc}\n{logs}") from None


def sees_members(base: str, collector_id: str, members: int) -> bool:
    line = f'gpufleet_collector_tier_members{{collector="{collector_id}"}} {float(members)}'
    return line.encode() in http_get(f"{base}/metrics/fleet", timeout=2)[1].splitlines()


def listen_port(count: int = 1) -> int:
    """The first of ``count`` free consecutive ports, below the ephemeral range: outgoing connections
    (the collectors' own to PostgreSQL) take no port there between this choice and the bind."""
    while True:
        first = random.randrange(20000, 32000)
        if all(free_port(port) == port for port in range(first, first + count)):
            return first


def start_host(
    processes: Processes, dsn: str, collector_id: str, grpc_port: int, http_port: int, **more: str
) -> str:
    """One member of the tier started with collector-tier.env, once it answers; its base URL."""
    examples = commented_examples(TIER_ENV)
    env = member_env(
        dsn,
        collector_id,
        grpc_port,
        http_port,
        GPUFLEET_ADVERTISE=f"127.0.0.1:{grpc_port}",
        GPUFLEET_LEASE_SECONDS=examples["GPUFLEET_LEASE_SECONDS"],
        **more,
    )
    base = start_member(processes, env)
    wait_answering(processes, base)
    return base


def test_two_collectors_with_the_tier_environment_file_form_a_tier(
    processes: Processes, postgresql: PostgresServer
) -> None:
    members = {
        collector_id: start_host(processes, postgresql.dsn, collector_id, listen_port(), listen_port())
        for collector_id in ("tier-a", "tier-b")
    }
    for collector_id, base in members.items():
        wait_until(
            lambda base=base, collector_id=collector_id: sees_members(base, collector_id, 2),
            what=f"{collector_id} to see both members",
        )
    assert all(process.poll() is None for process in processes.started)


def test_a_host_with_workers_joins_the_tier_with_the_tier_environment_file(
    processes: Processes, postgresql: PostgresServer
) -> None:
    first = start_host(processes, postgresql.dsn, "tier-a", listen_port(), listen_port())
    grpc_port, http_port = listen_port(), listen_port(2)
    while grpc_port in (http_port, http_port + 1):
        http_port = listen_port(2)
    # The file's example, with 2 workers rather than its 4: HTTP on the port + 0 and + 1.
    assert int(commented_examples(TIER_ENV)["GPUFLEET_WORKERS"]) > 1
    start_host(processes, postgresql.dsn, "host-b", grpc_port, http_port, GPUFLEET_WORKERS="2")
    parent = processes.started[-1]
    members = {"tier-a": first} | {f"host-b-{i}": f"http://127.0.0.1:{http_port + i}" for i in range(2)}
    for collector_id, base in members.items():
        wait_answering(processes, base)
        wait_until(
            lambda base=base, collector_id=collector_id: sees_members(base, collector_id, 3),
            what=f"{collector_id} to see the 3 members",
        )
    # systemctl stop: SIGTERM to the parent, which stops its workers.
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 0
