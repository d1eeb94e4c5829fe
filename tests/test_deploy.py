"""The Kubernetes manifests (service/kubernetes/headstart.yaml), checked as far as can be without a cluster: every
object parses, the probes and ports are BentoML's, the environment names only variables the service reads, the CPU
limit matches the worker and thread layout, and the autoscaler targets the Deployment. No cluster runs here."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT

MANIFESTS = ROOT / "service" / "kubernetes" / "headstart.yaml"


def objects() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    return {d["kind"]: d for d in docs}


#: Variables of the libraries' own the manifests may set: their usage reports off (service/usage_reports.py).
LIBRARY_VARIABLES = {"BENTOML_DO_NOT_TRACK", "ORT_DISABLE_TELEMETRY"}


def service_variables() -> set[str]:
    """Every HEADSTART_* variable the service reads (its settings: service/settings.py), and the libraries' it sets."""
    from headstart.service.settings import Settings

    return {variable for variable, _, _ in Settings.describe()} | LIBRARY_VARIABLES


def test_the_manifests_hold_a_deployment_a_service_and_an_autoscaler():
    assert set(objects()) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for obj in objects().values():
        assert obj["apiVersion"] and obj["metadata"]["name"] == "headstart"


def test_the_deployment_probes_bentomls_health_routes_on_its_port():
    dep = objects()["Deployment"]
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 3000}  # bentoml serve's port in the container
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == "3000"


def test_the_environment_is_the_services_and_the_cpu_limit_matches_its_layout():
    (container,) = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    unknown = set(env) - service_variables()
    assert not unknown, f"variables the service does not read: {unknown}"
    assert env["HEADSTART_DEVICE"] == "cpu" and env["HEADSTART_RUNTIME"] in ("auto", "openvino")
    cores = int(env["HEADSTART_WORKERS"]) * int(env["HEADSTART_THREADS"])
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert float(limits["cpu"]) == cores and float(requests["cpu"]) == cores


def test_the_service_and_the_autoscaler_point_at_the_deployment():
    svc, hpa, dep = objects()["Service"], objects()["HorizontalPodAutoscaler"], objects()["Deployment"]
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
