"""deploy/: systemd units, container, compose and Kubernetes files are valid and agree with the code.

Without Docker or a cluster here, what can be checked is checked for real: systemd-analyze
verifies the units, the Kubernetes and Compose files follow their schemas, every command line
and GPUFLEET_* setting goes through the programs' own argument parsers, every HTTP path they
name answers on a running collector, Mosquitto starts with the compose configuration, and the
files agree with each other (images, ports, names).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml

import gpufleet
from gpufleet.agent.attribution import kubelet
from gpufleet.agent.main import build_parser as agent_parser
from gpufleet.collector.main import build_parser as collector_parser
from gpufleet.ports import free_port
from tests.conftest import ROOT, Processes, environment, http_get, wait_until

DEPLOY = ROOT / "deploy"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
SCRIPTS = {ep.name for ep in distribution("gpufleet").entry_points if ep.group == "console_scripts"}
PARSERS = {"gpufleet-agent": agent_parser, "gpufleet-collector": collector_parser}
IMAGE = f"gpufleet:{gpufleet.__version__}"


def yaml_file(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kubernetes() -> list[dict[str, Any]]:
    kustomization = yaml_file(DEPLOY / "kubernetes" / "kustomization.yaml")
    return [
        doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / resource).read_text())
        if doc
    ]


def k8s(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in kubernetes() if doc["kind"] == kind]


def compose() -> dict[str, Any]:
    return yaml_file(DEPLOY / "compose" / "compose.yaml")  # type: ignore[no-any-return]


def env_file(path: Path) -> dict[str, str]:
    pairs = [
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    ]
    return {key: value for key, value in pairs}


def commented_examples(path: Path) -> dict[str, str]:
    """The settings an environment file shows commented out (#GPUFLEET_X=...)."""
    pairs = [
        line[1:].split("=", 1) for line in path.read_text().splitlines() if line.startswith("#GPUFLEET_")
    ]
    return {key: value for key, value in pairs}


def parse(program: str, args: list[str], env: dict[str, str]) -> argparse.Namespace:
    """What the program makes of this command line and environment; fails on what it refuses."""
    assert program in PARSERS, program
    flags = env_names(program)
    unknown = sorted(set(env) - flags)
    assert not unknown, f"{program} has no flags for {unknown}"
    with environment(**env):
        try:
            return PARSERS[program]().parse_args(args)
        except SystemExit:
            raise AssertionError(f"{program} refuses {args} with {env}") from None


def env_names(program: str) -> set[str]:
    """The GPUFLEET_* variables the program reads, as its --help lists them."""
    return set(re.findall(r"env\s+(GPUFLEET_\w+)", PARSERS[program]().format_help()))


def collector_ports(env: dict[str, str] | None = None) -> tuple[int, int]:
    args = parse("gpufleet-collector", [], env or {})
    return args.grpc_listen[1], args.http_listen[1]


# -- systemd ---------------------------------------------------------------------------------

UNITS = {"gpufleet-agent.service": "gpufleet-agent", "gpufleet-collector.service": "gpufleet-collector"}


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found: run the tests with `make test`, which installs systemd"
    copies = []
    for unit, program in UNITS.items():
        text = (DEPLOY / "systemd" / unit).read_text()
        installed = f"/opt/gpufleet/bin/{program}"
        assert f"ExecStart={installed}\n" in text
        # Verify against the scripts this checkout installed, where /opt/gpufleet does not exist.
        copy = tmp_path / unit
        copy.write_text(text.replace(installed, str(Path(sys.executable).parent / program)))
        copies.append(str(copy))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=60
    )
    # systemd-analyze only warns about unknown keys and bad values: any output is a finding.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_units_are_hardened_and_restart(unit: str) -> None:
    settings = unit_settings(DEPLOY / "systemd" / unit)
    assert settings["Restart"] == ["on-failure"]
    assert settings["DynamicUser"] == ["yes"]  # never root
    assert settings["NoNewPrivileges"] == ["yes"] and settings["CapabilityBoundingSet"] == [""]
    assert settings["ProtectSystem"] == ["strict"]
    env_path = settings["EnvironmentFile"][0].lstrip("-")
    assert env_path == f"/etc/gpufleet/{unit.removeprefix('gpufleet-').removesuffix('.service')}.env"


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_environment_files_hold_settings_the_programs_accept(program: str) -> None:
    name = program.removeprefix("gpufleet-")
    env = env_file(DEPLOY / "systemd" / f"{name}.env")
    args = parse(program, [], env)
    state_directory = unit_settings(DEPLOY / "systemd" / f"{program}.service")["StateDirectory"][0]
    if program == "gpufleet-collector":
        assert collector_ports(env) == (50051, 9490)
        assert args.db.startswith(f"/var/lib/{state_directory}/")
    else:
        assert args.spool_dir.startswith(f"/var/lib/{state_directory}/")


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_commented_examples_in_environment_files_are_settings_the_programs_have(program: str) -> None:
    examples = commented_examples(DEPLOY / "systemd" / f"{program.removeprefix('gpufleet-')}.env")
    assert examples
    unknown = sorted(set(examples) - env_names(program))
    assert not unknown, f"{program} has no flags for {unknown}"


def test_the_agents_attribution_examples_are_values_it_accepts() -> None:
    """The TLS examples name files that exist only on a configured host; these need none."""
    examples = commented_examples(DEPLOY / "systemd" / "agent.env")
    attribution = {key: examples[key] for key in ("GPUFLEET_JOB_MAPPING_DIR", "GPUFLEET_KUBELET_SOCKET")}
    args = parse("gpufleet-agent", [], {**env_file(DEPLOY / "systemd" / "agent.env"), **attribution})
    assert args.kubelet_socket == kubelet.DEFAULT_SOCKET
    assert args.job_mapping_dir == attribution["GPUFLEET_JOB_MAPPING_DIR"]


# -- container -------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "container" / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_the_image_installs_the_package_and_runs_as_non_root() -> None:
    instructions = dockerfile()
    sources = [
        part
        for op, args in instructions
        if op == "COPY" and "--from" not in args
        for part in args.split()[:-1]
    ]
    for source in sources:
        assert (ROOT / source).exists(), source
    include = re.search(r"^include = \[(.*)\]$", PYPROJECT, re.MULTILINE)
    readme = re.search(r'^readme = "(.*)"$', PYPROJECT, re.MULTILINE)
    assert include and readme
    packages = {p.strip(' "*') for p in include.group(1).split(",")}
    assert packages <= set(sources)
    assert {"pyproject.toml", readme.group(1)} <= set(sources)
    # The build context keeps what the COPY lines need.
    ignore = (DEPLOY / "container" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {f"!{source}" for source in sources} <= set(ignore) and "*" in ignore
    for op, args in instructions:
        if op == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), image
    user = [args for op, args in instructions if op == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    exposed = {int(port) for op, args in instructions if op == "EXPOSE" for port in args.split()}
    assert exposed == set(collector_ports())
    command = [args for op, args in instructions if op == "CMD"][-1]
    assert yaml.safe_load(command)[0] in SCRIPTS


# -- compose ---------------------------------------------------------------------------------


def compose_command(service: dict[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    command = service["command"]
    env = {k: str(v) for k, v in service.get("environment", {}).items() if k.startswith("GPUFLEET_")}
    return command[0], command[1:], env


def test_compose_runs_the_programs_with_flags_and_ports_they_have() -> None:
    services = compose()["services"]
    assert {"collector", "fleet", "prometheus", "grafana", "mosquitto"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
        if image.startswith("gpufleet:"):
            assert image == IMAGE, name
            program, args, env = compose_command(service)
            assert program in SCRIPTS
            parse(program, args, env)
    assert services["collector"]["build"]["dockerfile"] == "deploy/container/Dockerfile"
    assert (
        DEPLOY / "compose" / services["collector"]["build"]["context"] / "deploy/container/Dockerfile"
    ).exists()
    _, _, env = compose_command(services["collector"])
    grpc_port, http_port = collector_ports(env)
    assert {f"{http_port}:{http_port}", f"{grpc_port}:{grpc_port}"} <= set(services["collector"]["ports"])
    # The simulated fleet reports to the collector service's gRPC port.
    program, args, env = compose_command(services["fleet"])
    assert parse(program, args, env).collector == [f"collector:{grpc_port}"]
    # Prometheus scrapes the collector service's HTTP port.
    prometheus_config = yaml_file(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        t for job in prometheus_config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    }
    assert targets == {f"collector:{http_port}"}


def test_compose_mounts_files_that_exist() -> None:
    services = compose()["services"]
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).exists(), source
                mounts[target] = (DEPLOY / "compose" / source).resolve()
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    grafana = services["grafana"]["environment"]
    home = Path(grafana["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    provider = yaml_file(mounts["/etc/grafana/provisioning"] / "dashboards" / "gpufleet.yml")
    assert provider["providers"][0]["options"]["path"] == str(home.parent)
    datasource = yaml_file(mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml")
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]


def venv_tool(name: str) -> str:
    """A command-line tool of the dev dependencies, installed next to this Python."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} not found: run the tests with `make test`, which installs it"
    return str(path)


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
        cwd=DEPLOY / "compose",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mosquitto_starts_with_the_compose_configuration(tmp_path: Path) -> None:
    mosquitto = shutil.which("mosquitto")
    assert mosquitto, "mosquitto not found: run the tests with `make test`, which installs it"
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    text = (DEPLOY / "compose" / "mosquitto.conf").read_text()
    assert "listener 1883\n" in text
    config.write_text(text.replace("listener 1883\n", f"listener {port} 127.0.0.1\n"))
    process = subprocess.Popen(
        [mosquitto, "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_until(listening, timeout=10, what="mosquitto to listen")
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- Kubernetes ------------------------------------------------------------------------------


def containers(kind: str) -> list[dict[str, Any]]:
    (workload,) = k8s(kind)
    return workload["spec"]["template"]["spec"]["containers"]  # type: ignore[no-any-return]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """GPUFLEET_* settings with literal values (fieldRef values checked by name only)."""
    env = {}
    for item in container.get("env", []):
        if item["name"].startswith("GPUFLEET_"):
            env[item["name"]] = item.get("value", "from-the-cluster")
    return env


def test_kubernetes_objects_parse_and_run_the_programs_with_settings_they_have() -> None:
    objects = kubernetes()
    kinds = sorted(doc["kind"] for doc in objects)
    assert kinds == ["DaemonSet", "Deployment", "Namespace", "PrometheusRule", "Service", "ServiceMonitor"]
    assert {doc["metadata"].get("namespace", doc["metadata"]["name"]) for doc in objects} == {"gpufleet"}
    kustomization = yaml_file(DEPLOY / "kubernetes" / "kustomization.yaml")
    (image,) = kustomization["images"]
    assert f"{image['newName']}:{image['newTag']}" == IMAGE
    for kind in ("Deployment", "DaemonSet"):
        (workload,) = k8s(kind)
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        # The collector runs as a user; the agent as root without capabilities (the kubelet's
        # pod-resources socket admits only root).
        root = kind == "DaemonSet"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is not root
        assert (pod["spec"]["securityContext"]["runAsUser"] == 0) is root
        (container,) = pod["spec"]["containers"]
        assert container["image"] == IMAGE
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        program = container["command"][0]
        parse(program, container.get("args", []), container_env(container))


def test_kubernetes_objects_follow_the_kubernetes_api_schemas() -> None:
    """Strict: an unknown or misspelt field fails. The operator's CRDs are checked further on."""
    operator = {"servicemonitor.yaml", "prometheusrule.yaml"}
    resources = yaml_file(DEPLOY / "kubernetes" / "kustomization.yaml")["resources"]
    assert operator <= set(resources)
    files = [str(DEPLOY / "kubernetes" / resource) for resource in resources if resource not in operator]
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.30.0", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output
    passed = set(re.findall(r"passed for resource (\S+)", output))
    assert passed == {
        "namespace/gpufleet",
        "deployment/gpufleet-collector",
        "service/gpufleet-collector",
        "daemonset/gpufleet-agent",
    }


def test_the_agent_runs_on_gpu_nodes_and_finds_the_collector_service() -> None:
    (daemonset,) = k8s("DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia" and spec["nodeSelector"]
    (container,) = spec["containers"]
    env = {item["name"]: item for item in container["env"]}
    # The node's name, not the pod's (dcgm-exporter's Hostname was the pod's for years).
    assert env["GPUFLEET_HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    (service,) = k8s("Service")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert env["GPUFLEET_COLLECTOR"]["value"] == f"{name}.{namespace}.svc:{grpc_port}"


def test_the_agent_reads_the_kubelet_pod_resources_socket_through_a_read_only_mount() -> None:
    (daemonset,) = k8s("DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = parse("gpufleet-agent", container.get("args", []), container_env(container))
    assert args.kubelet_socket == kubelet.DEFAULT_SOCKET == "/var/lib/kubelet/pod-resources/kubelet.sock"
    socket_dir = str(Path(args.kubelet_socket).parent)
    # The socket's directory (the kubelet makes the socket anew when it restarts), read-only, at
    # the same path as on the host.
    (mount,) = [
        m for m in container["volumeMounts"] if Path(args.kubelet_socket).is_relative_to(m["mountPath"])
    ]
    assert mount["mountPath"] == socket_dir and mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"] == {"path": socket_dir, "type": "Directory"}


def test_the_service_monitor_keeps_the_collectors_workload_labels() -> None:
    """The operator's namespace, pod and container target labels would rename the collector's
    (gpufleet_gpu_allocation_info, gpufleet_workload_*, the dcgm view) to exported_*."""
    (monitor,) = k8s("ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        dropped = [r["regex"] for r in endpoint["relabelings"] if r.get("action") == "labeldrop"]
        for label in ("namespace", "pod", "container"):
            assert any(re.fullmatch(regex, label) for regex in dropped), (endpoint["path"], label)


def test_the_service_and_service_monitor_reach_the_collectors_ports() -> None:
    (container,) = containers("Deployment")
    grpc_port, http_port = collector_ports(container_env(container))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "http": http_port}
    (deployment,) = k8s("Deployment")
    (service,) = k8s("Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    (monitor,) = k8s("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    # The same jobs as deploy/prometheus/prometheus.yml, and every shard of the sharded one.
    jobs = {
        r["replacement"]
        for e in monitor["spec"]["endpoints"]
        for r in e["relabelings"]
        if r.get("targetLabel") == "job"
    }
    prometheus_jobs = {
        job["job_name"] for job in yaml_file(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    assert jobs == prometheus_jobs
    shards = [e["params"] for e in monitor["spec"]["endpoints"] if "shard" in e.get("params", {})]
    (count,) = {int(p["shards"][0]) for p in shards}
    assert sorted(int(p["shard"][0]) for p in shards) == list(range(count))


def test_the_prometheus_rule_holds_the_rule_files() -> None:
    (rule,) = k8s("PrometheusRule")
    groups = [
        group
        for name in ("recording.yml", "alerts.yml")
        for group in yaml_file(DEPLOY / "prometheus" / name)["groups"]
    ]
    assert rule["spec"]["groups"] == groups, "regenerate deploy/kubernetes/prometheusrule.yaml"


# -- every HTTP path the deploy files name ---------------------------------------------------


def http_paths() -> set[str]:
    paths = set()
    (container,) = containers("Deployment")
    for probe in ("readinessProbe", "livenessProbe"):
        paths.add(container[probe]["httpGet"]["path"])
    (monitor,) = k8s("ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        params = {key: values[0] for key, values in endpoint.get("params", {}).items()}
        paths.add(endpoint["path"] + (f"?{urlencode(params)}" if params else ""))
    for job in yaml_file(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]:
        params = {key: values[0] for key, values in job.get("params", {}).items()}
        for static in job["static_configs"]:
            shard = static.get("labels", {}).get("__param_shard")
            query = {**params, **({"shard": shard} if shard else {})}
            paths.add(job["metrics_path"] + (f"?{urlencode(query)}" if query else ""))
    healthcheck = " ".join(compose()["services"]["collector"]["healthcheck"]["test"])
    paths.update(re.findall(r"http://[\w.]+:\d+(/[\w/]+)", healthcheck))
    return paths


def test_every_http_path_the_deploy_files_name_answers(processes: Processes) -> None:
    _, _, base = processes.collector()
    paths = http_paths()
    assert {"/readyz", "/healthz", "/metrics/fleet", "/metrics/dcgm"} <= paths
    assert any(path.startswith("/metrics/nodes?") for path in paths)
    for path in sorted(paths):
        status, body, _ = http_get(base + path)
        assert status == 200, f"{path}: {status} {body[:200]!r}"
