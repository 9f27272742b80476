"""deploy/kubernetes/, proven without a cluster.

1. Every manifest validates offline against the Kubernetes OpenAPI schemas that `kubernetes-validate`
   ships inside its package (strict: an unknown or misspelt field fails), at the oldest version we
   support (1.27, where gRPC probes went GA) and the newest the package knows.
2. The containers are what the services' own CLIs accept: each container's command, args and env are
   parsed by that service's `build_parser()` (flags and TOKENWIRE_* variables generated from the config
   dataclasses), and the ports, probes and grace periods are checked against the parsed config, and
   against docker-compose.yml, so the two deployments cannot drift apart.
3. The gateway's probe paths are asked of the real app: readiness (/health) fails while the services
   are unreachable, liveness answers regardless; and the Dockerfile copies every package the image installs.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from tokenwire.engine.cli import build_parser as engine_parser
from tokenwire.gateway.app import create_app
from tokenwire.gateway.cli import build_parser as gateway_parser
from tokenwire.gateway.cli import config_from_args as gateway_config
from tokenwire.serving.cli_env import apply_env_defaults, env_name
from tokenwire.serving.launcher import free_port
from tokenwire.tokenizer.cli import build_parser as tokenizer_parser

from tests.compose_file import load_compose

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
PARSERS = {"tokenizer": tokenizer_parser, "engine": engine_parser, "gateway": gateway_parser}
GRPC = ("tokenizer", "engine")  # the gRPC services: model cache, native gRPC probes, a metrics port
PORTS = {"tokenizer": 50051, "engine": 50052, "gateway": 8000}
# Variables each container shares with its compose service, at least.
SHARED = {
    "tokenizer": {"TOKENWIRE_MODEL"},
    "engine": {"TOKENWIRE_MODEL"},
    "gateway": {"TOKENWIRE_TOKENIZER", "TOKENWIRE_ENGINE", "TOKENWIRE_SERVED_MODEL_NAME"},
}
# Variables the services read that are not flags (README, "Other variables").
NON_FLAG_VARIABLES = {"TOKENWIRE_HOME", "HF_HOME"}
LABELS = {"app.kubernetes.io/name": "tokenwire"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> dict[str, dict]:
    """file name -> its one object, for every resource the kustomization lists."""
    return {name: yaml.safe_load((K8S / name).read_text()) for name in kustomization()["resources"]}


def objects(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in manifests().values() if o["kind"] == kind}


def container(component: str) -> dict:
    (main,) = objects("Deployment")[component]["spec"]["template"]["spec"]["containers"]
    return main


def env(spec: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", [])}


def parsed(component: str) -> argparse.Namespace:
    """The container's command line and environment, through the service's own CLI."""
    spec = container(component)
    parser = PARSERS[component]()
    apply_env_defaults(parser, env(spec))
    return parser.parse_args(spec["args"])


# ---- the files ----


def test_the_kustomization_lists_every_manifest():
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == on_disk


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates_against_the_kubernetes_schema(name, version):
    (document,) = list(yaml.safe_load_all((K8S / name).read_text()))  # one object per file
    kubernetes_validate.validate(document, version, strict=True)


def test_validation_is_strict_enough_to_catch_mistakes():
    deployment = objects("Deployment")["engine"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50052
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = objects("Deployment")["engine"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


# ---- the containers against the CLIs ----


@pytest.mark.parametrize("component", PARSERS)
def test_every_variable_is_a_flag_of_the_service(component):
    flags = {env_name(a) for a in PARSERS[component]()._actions} - {None}
    assert set(env(container(component))) - NON_FLAG_VARIABLES <= flags


@pytest.mark.parametrize("component", GRPC)
def test_ports_and_probes_match_the_parsed_config(component):
    spec, args = container(component), parsed(component)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert args.port == PORTS[component] and args.host == "0.0.0.0"  # reachable from other pods
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": args.port}, probe  # native grpc.health.v1 probe
    # A draining pod answers NOT_SERVING: liveness must not restart it before the drain ends, and
    # Kubernetes' SIGKILL must come after it too.
    pod = objects("Deployment")[component]["spec"]["template"]["spec"]
    live = spec["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > args.drain_grace_s
    assert pod["terminationGracePeriodSeconds"] > args.drain_grace_s
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # first load + warm-up, or a conversion


@pytest.mark.parametrize("component", PARSERS)
def test_containers_run_what_compose_runs(component):
    service = load_compose()["services"][component]
    spec = container(component)
    assert [*spec["command"], *spec["args"]] == service["command"]
    shared = set(service["environment"]) & set(env(spec))
    assert shared >= {"TOKENWIRE_LOG_FORMAT", "TOKENWIRE_DRAIN_GRACE_S"} | SHARED[component]
    assert {k: env(spec)[k] for k in shared} == {k: str(service["environment"][k]) for k in shared}


@pytest.mark.parametrize("component", GRPC)
def test_the_init_container_prepares_the_served_model_into_the_cache(component):
    pod = objects("Deployment")[component]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["python", "-m", "tokenwire.serving.model_resolver", "$(TOKENWIRE_MODEL)"]
    assert env(init)["TOKENWIRE_MODEL"] == env(container(component))["TOKENWIRE_MODEL"]
    cache = env(container(component))["TOKENWIRE_HOME"]
    assert env(init)["TOKENWIRE_HOME"] == cache
    for spec in (init, container(component)):
        mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
        assert mounts == {cache: "model-cache", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["model-cache"] and "emptyDir" in volumes["tmp"]


@pytest.mark.parametrize("component", PARSERS)
def test_pods_run_unprivileged_on_a_read_only_root(component):
    pod = objects("Deployment")[component]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["serviceAccountName"] == "tokenwire" and pod["automountServiceAccountToken"] is False
    for spec in (*pod.get("initContainers", []), *pod["containers"]):
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False
        assert set(spec["resources"]) == {"requests", "limits"}
    assert objects("ServiceAccount")["tokenwire"]["automountServiceAccountToken"] is False


def test_services_select_their_deployments():
    services, deployments = objects("Service"), objects("Deployment")
    assert services["engine"]["spec"]["clusterIP"] == "None"  # headless: DNS lists every engine pod
    assert services["tokenizer"]["spec"]["type"] == "ClusterIP"
    assert services["gateway"]["spec"]["type"] == "ClusterIP"
    for name in PARSERS:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert services[name]["spec"]["selector"].items() <= labels.items()
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert LABELS.items() <= labels.items()
        ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        if name == "gateway":
            assert ports == {"http": PORTS[name]}  # /metrics is served on the HTTP port
        else:
            assert ports == {"grpc": PORTS[name], "metrics": parsed(name).metrics_port}


def test_the_engine_scales_and_survives_disruptions():
    deployments = objects("Deployment")
    assert deployments["engine"]["spec"]["replicas"] == 2
    engine_labels = deployments["engine"]["spec"]["template"]["metadata"]["labels"]
    pdb = objects("PodDisruptionBudget")["engine"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= engine_labels.items()
    hpa = objects("HorizontalPodAutoscaler")["engine"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "engine"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


# ---- the gateway ----


def test_the_gateway_reaches_the_services_through_their_services():
    args = parsed("gateway")
    assert args.port == PORTS["gateway"] and args.host == "0.0.0.0"
    assert args.tokenizer == f"tokenizer:{PORTS['tokenizer']}"  # the tokenizer's ClusterIP
    assert args.engine == f"dns:///engine:{PORTS['engine']}"  # every pod of the headless Service
    services = objects("Service")
    assert services["engine"]["spec"]["clusterIP"] == "None" and "tokenizer" in services
    assert args.served_model_name == env(container("engine"))["TOKENWIRE_MODEL"]


def test_gateway_probes_and_grace_cover_its_drain():
    spec, args = container("gateway"), parsed("gateway")
    assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {"http": args.port}
    ready, live = spec["readinessProbe"]["httpGet"], spec["livenessProbe"]["httpGet"]
    assert ready == {"path": "/health", "port": "http"}
    assert live["port"] == "http" and live["path"] != "/health"
    # uvicorn stops accepting at SIGTERM: liveness must not restart the pod before the drain ends.
    probe = spec["livenessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > args.drain_grace_s
    pod = objects("Deployment")["gateway"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > args.drain_grace_s
    assert "initContainers" not in pod  # no model in the gateway
    assert {m["mountPath"] for m in spec["volumeMounts"]} == {"/tmp"}


def test_gateway_liveness_answers_while_readiness_waits_for_the_services():
    """The real app, configured as the manifest configures it but with services that are not there."""
    spec = container("gateway")
    nowhere = f"127.0.0.1:{free_port()}"
    config = replace(gateway_config(parsed("gateway")), tokenizer=nowhere, engine=nowhere)
    with TestClient(create_app(config)) as http:
        assert http.get(spec["readinessProbe"]["httpGet"]["path"]).status_code == 503
        assert http.get(spec["livenessProbe"]["httpGet"]["path"]).status_code == 200


def test_the_image_holds_every_installed_package():
    """`pip install .` in the Dockerfile fails on a package folder it was not given."""
    folders = {
        d.split("/")[0]
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    }
    copied = set(re.findall(r"^COPY (\S+) \1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert folders <= copied, folders - copied
