"""Deployment files checked by the real tools: docker compose config, hadolint, a Kubernetes schema validator."""
import json
import re
import subprocess
import sys
from pathlib import Path

import compose
import kubernetes_validate
import pytest
import yaml
from observability_files import DEPLOY, REPO

from server.cli import parse_args

COMPOSE_BINARY = Path(compose.__file__).resolve().parent / "docker-compose"
HADOLINT_BINARY = Path(sys.executable).parent / "hadolint"
KUBERNETES = DEPLOY / "kubernetes"


def compose_config(*files: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    """The compose v2 binary itself: the package's console wrapper exits 0 whatever happens."""
    args = [str(COMPOSE_BINARY)] + [arg for name in files for arg in ("-f", name)] + ["config", "--format", "json"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_compose_gpu_stack_is_valid():
    result = compose_config("docker-compose.yml")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"dots-serve", "prometheus", "grafana"}
    server = services["dots-serve"]
    assert server["build"] == {"context": str(REPO), "dockerfile": "Dockerfile"}
    [device] = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    [model] = server["volumes"]
    assert model["type"] == "bind" and model["read_only"] is True
    assert flag_value(server["command"], "--model") == model["target"]
    assert "http://127.0.0.1:8000/health" in " ".join(server["healthcheck"]["test"])
    assert [port["target"] for port in server["ports"]] == [8000]
    shutdown_timeout = int(flag_value(server["command"], "--shutdown-timeout"))
    assert parse_seconds(server["stop_grace_period"]) > shutdown_timeout
    prometheus_mounts = {volume["target"]: volume for volume in services["prometheus"]["volumes"]}
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"]["source"] == str(DEPLOY / "prometheus/prometheus.yml")
    assert prometheus_mounts["/etc/prometheus/alerts.yml"]["source"] == str(DEPLOY / "prometheus/alerts.yml")
    grafana = services["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_cpu_override_drops_the_gpu_and_serves_the_embedded_model():
    result = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["services"]["dots-serve"]
    assert "deploy" not in server
    assert "volumes" not in server
    assert "--model" not in server["command"]
    assert flag_value(server["command"], "--device") == "cpu"
    assert "http://127.0.0.1:8000/health" in " ".join(server["healthcheck"]["test"])


def test_compose_binary_rejects_an_invalid_file(tmp_path):
    (tmp_path / "docker-compose.yml").write_text("services:\n  web:\n    image: nginx\n    ports: 8000\n")
    result = compose_config("docker-compose.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "ports" in result.stderr


def parse_seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(value) * units[unit] for value, unit in re.findall(r"([\d.]+)([hms])", duration))


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HADOLINT_BINARY), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        cwd=dockerfile.parent, env={"PATH": "/usr/bin:/bin", "HOME": str(dockerfile.parent)},
        capture_output=True, text=True, timeout=60,
    )


def test_dockerfile_is_lint_clean():
    result = hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_dots_serve_as_a_non_root_user_on_a_cuda_pytorch_base():
    instructions = dockerfile_instructions()
    values = {name: [value for key, value in instructions if key == name] for name, _ in instructions}
    [base] = values["FROM"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base)
    assert values["USER"][-1].split(":")[0] not in {"0", "root"}
    assert values["EXPOSE"] == ["8000"]
    [healthcheck] = values["HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert json.loads(values["ENTRYPOINT"][-1]) == ["dots-serve", "--host", "0.0.0.0"]
    assert json.loads(values["CMD"][-1]) == ["--port", "8000"]
    # Kept from the base image: the install must not bring another torch.
    assert any("import torch" in run and "-c /tmp/torch-constraint.txt" in run for run in values["RUN"])


def test_dockerignore_keeps_what_the_image_copies_and_nothing_else():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*"
    included = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = set()
    for name, value in dockerfile_instructions():
        if name == "COPY":
            copied.update(value.split()[:-1])
    assert copied == included
    for path in included:
        assert (REPO / path).exists(), path


def kubernetes_documents() -> dict[str, dict]:
    documents = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def test_kubernetes_manifests_are_schema_valid():
    documents = kubernetes_documents()
    assert set(documents) == {"Deployment", "Service", "PodMonitor"}
    version = kubernetes_validate.latest_version()
    for kind in ["Deployment", "Service"]:
        kubernetes_validate.validate(documents[kind], version, strict=True)
    # The validator ships core schemas only: the Prometheus Operator's CRD is checked by hand below.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(documents["PodMonitor"], version, strict=True)


def test_kubernetes_validator_rejects_an_unknown_field():
    deployment = kubernetes_documents()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_gpus_and_graceful_drain():
    pod = kubernetes_documents()["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"].startswith("dots-serve:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    [port] = container["ports"]
    assert port["name"] == "http" and port["containerPort"] == int(flag_value(container["args"], "--port"))
    pre_stop_seconds = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown_timeout = int(flag_value(container["args"], "--shutdown-timeout"))
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + shutdown_timeout
    assert pod["securityContext"]["runAsNonRoot"] is True
    model_dir = flag_value(container["args"], "--model")
    [model_mount] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == model_dir]
    assert model_mount["readOnly"] is True


def test_service_and_scrape_configuration_select_the_pods():
    documents = kubernetes_documents()
    template = documents["Deployment"]["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    [container] = template["spec"]["containers"]
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}

    service = documents["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert all(port["targetPort"] in port_names for port in service["ports"])

    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_names["http"]
    assert annotations["prometheus.io/path"] == "/metrics"

    pod_monitor = documents["PodMonitor"]
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # The alert rules select job="dots-serve".
    assert pod_labels[pod_monitor["spec"]["jobLabel"]] == "dots-serve"


def container_command(arguments: list[str]) -> list[str]:
    """What the container runs: the image's ENTRYPOINT followed by the arguments given to it."""
    entrypoint = dict(dockerfile_instructions())["ENTRYPOINT"]
    return json.loads(entrypoint)[1:] + arguments


def test_every_shipped_command_line_is_accepted_by_the_server_cli():
    default_cmd = json.loads(dict(dockerfile_instructions())["CMD"])
    gpu = json.loads(compose_config("docker-compose.yml").stdout)["services"]["dots-serve"]["command"]
    cpu = json.loads(compose_config("docker-compose.yml", "docker-compose.cpu.yml").stdout)
    [container] = kubernetes_documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    for arguments in [default_cmd, gpu, cpu["services"]["dots-serve"]["command"], container["args"]]:
        args = parse_args(container_command(arguments))
        assert args.host == "0.0.0.0" and args.port == 8000, arguments
    k8s = parse_args(container_command(container["args"]))
    assert k8s.tensor_parallel_size == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert parse_args(container_command(cpu["services"]["dots-serve"]["command"])).device == "cpu"


def test_systemd_unit_drains_before_it_kills():
    """The whole cgroup gets SIGTERM (the server drains, its children ignore it), and SIGKILL only after the drain."""
    unit = {}
    for line in (DEPLOY / "systemd" / "dots-serve.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit[key] = value
    assert unit["KillMode"] == "control-group" and unit["KillSignal"] == "SIGTERM"
    command = unit["ExecStart"].split()
    args = parse_args(command[1:])
    assert command[0].endswith("/dots-serve")
    assert parse_seconds(unit["TimeoutStopSec"] + "s") > args.shutdown_timeout + 30  # + the engine's own shutdown
    assert unit["Restart"] == "on-failure"
