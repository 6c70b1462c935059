"""Replicas behind routers: the compose stack with vllm-router, and the llm-d InferencePool and endpoint picker.

The InferencePool is validated against the Gateway API inference extension's own CRD schema (v1.6.0, vendored under
tests/fixtures); the picker's Deployment, Service, RBAC and ConfigMap against the Kubernetes schemas. Neither the
picker nor a gateway runs here.
"""
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml
from observability_files import DEPLOY, REPO
from test_deploy_files import (
    KUBERNETES,
    compose_config,
    container_command,
    flag_value,
    hadolint,
    kubernetes_documents,
)

from server.cli import parse_args

LLM_D = KUBERNETES / "llm-d"
INFERENCE_POOL_CRD = REPO / "tests" / "fixtures" / "gateway-api-inference-extension" / "inferencepools-v1.6.0.yaml"


def llm_d_documents() -> dict[str, dict]:
    documents = {}
    for path in sorted(LLM_D.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def inference_pool_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(INFERENCE_POOL_CRD.read_text())
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.6.0"
    [version] = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def test_inference_pool_is_valid_against_the_pinned_crd_and_selects_the_served_pods():
    pool = llm_d_documents()["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    inference_pool_validator().validate(pool)
    template = kubernetes_documents()["Deployment"]["spec"]["template"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    [container] = template["spec"]["containers"]
    assert [port["number"] for port in pool["spec"]["targetPorts"]] == [int(flag_value(container["args"], "--port"))]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # only Ready pods join the pool


def test_crd_schema_rejects_a_pool_without_target_ports():
    pool = llm_d_documents()["InferencePool"]
    del pool["spec"]["targetPorts"]
    with pytest.raises(jsonschema.ValidationError):
        inference_pool_validator().validate(pool)
    pool = llm_d_documents()["InferencePool"]
    pool["spec"]["appProtocol"] = "grpc"
    with pytest.raises(jsonschema.ValidationError):
        inference_pool_validator().validate(pool)


def test_endpoint_picker_manifests_are_schema_valid_and_wired_to_the_pool():
    documents = llm_d_documents()
    version = kubernetes_validate.latest_version()
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"):
        kubernetes_validate.validate(documents[kind], version, strict=True)
    pool = documents["InferencePool"]["spec"]
    deployment = documents["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    image, tag = container["image"].rsplit(":", 1)
    assert image == "ghcr.io/llm-d/llm-d-router-endpoint-picker" and tag.startswith("v")  # pinned, not main
    assert flag_value(container["args"], "--pool-name") == documents["InferencePool"]["metadata"]["name"]
    service = documents["Service"]
    assert service["metadata"]["name"] == pool["endpointPickerRef"]["name"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    [grpc] = [port for port in service["spec"]["ports"] if port["port"] == pool["endpointPickerRef"]["port"]["number"]]
    assert int(flag_value(container["args"], "--grpc-port")) == grpc["port"]
    config_file = flag_value(container["args"], "--config-file")
    [mount] = container["volumeMounts"]
    assert config_file.startswith(mount["mountPath"] + "/")
    picker_config = yaml.safe_load(documents["ConfigMap"]["data"][config_file.rsplit("/", 1)[1]])
    assert picker_config["kind"] == "EndpointPickerConfig"
    plugins = {plugin["type"] for plugin in picker_config["plugins"]}
    for profile in picker_config["schedulingProfiles"]:
        assert {entry["pluginRef"] for entry in profile["plugins"]} <= plugins
    rules = documents["Role"]["rules"]
    assert any("inferencepools" in rule["resources"] for rule in rules)
    assert any("pods" in rule["resources"] for rule in rules)


def routers_stack() -> dict:
    result = compose_config("docker-compose.routers.yml")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_router_stack_puts_two_replicas_behind_vllm_router():
    services = routers_stack()
    assert set(services) == {"dots-serve-a", "dots-serve-b", "router", "prometheus", "grafana"}
    router = services["router"]["command"]
    assert flag_value(router, "--policy") in ("cache_aware", "power_of_two")
    workers = router[router.index("--worker-urls") + 1:router.index("--worker-urls") + 3]
    assert workers == ["http://dots-serve-a:8000", "http://dots-serve-b:8000"]
    assert flag_value(router, "--health-check-endpoint") == "/ready"
    gpus = []
    for name in ("dots-serve-a", "dots-serve-b"):
        replica = services[name]
        args = parse_args(container_command(replica["command"]))
        assert args.host == "0.0.0.0" and args.port == 8000 and args.vllm_metrics
        assert "http://127.0.0.1:8000/ready" in " ".join(replica["healthcheck"]["test"])
        [device] = replica["deploy"]["resources"]["reservations"]["devices"]
        gpus.append(set(device["device_ids"]))
        assert len(device["device_ids"]) == args.tensor_parallel_size
    assert not gpus[0] & gpus[1]  # the replicas do not share a GPU


def test_prometheus_scrapes_each_replica_on_its_api_port():
    services = routers_stack()
    mounts = {volume["target"]: volume["source"] for volume in services["prometheus"]["volumes"]}
    config = yaml.safe_load(open(mounts["/etc/prometheus/prometheus.yml"]).read())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "dots-serve" and job["metrics_path"] == "/metrics"  # the alert rules' job
    [targets] = job["static_configs"]
    assert sorted(targets["targets"]) == ["dots-serve-a:8000", "dots-serve-b:8000"]


def test_router_image_is_lint_clean_and_pins_the_router():
    dockerfile = DEPLOY / "router" / "Dockerfile"
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vllm-router==0.1.17" in dockerfile.read_text()
    assert "vllm-router==0.1.17" in (REPO / "pyproject.toml").read_text()  # the version the tests run against
