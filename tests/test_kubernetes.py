"""The Kubernetes manifests (docker/kubernetes/): validated offline against the Kubernetes JSON schemas of
kubernetes-validate (strict: unknown fields are errors), and consistent with the serving image."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "docker" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # the oldest minor GKE, EKS and AKS all still support (2026)
SERVING_PORT = 8080  # the image's nginx (tests/test_docker.py checks MLflow's configuration)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(folder: str) -> dict[str, dict]:
    return {doc["kind"]: doc for path in sorted((MANIFESTS / folder).glob("*.yaml")) for doc in _documents(path)}


def _part_validator(schema_file: str) -> jsonschema.Validator:
    """A strict validator for one Kubernetes type (e.g. container-v1.json), for the parts of a custom
    resource that are Kubernetes types: KServe's own CRD schema is not on PyPI."""
    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION[:-2]}.0-local-strict"
    schema = schema_contents(f"{folder}/{schema_file}", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("path", sorted(p.relative_to(MANIFESTS) for p in (MANIFESTS / "serve").glob("*.yaml")),
                         ids=str)
def test_plain_manifests_match_the_kubernetes_schemas(path):
    for doc in _documents(MANIFESTS / path):
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_what_kubernetes_would():
    """The check has teeth: a misspelt field, a string where a number goes, a missing selector."""
    deployment = _by_kind("serve")["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    broken = [
        {**deployment, "spec": {**deployment["spec"], "replica": 2}},
        {**deployment, "spec": {**deployment["spec"], "replicas": "two"}},
        {**deployment, "spec": {k: v for k, v in deployment["spec"].items() if k != "selector"}},
    ]
    for doc in broken:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert list(_part_validator("container-v1.json").iter_errors({**container, "port": 8080}))


def test_deployment_serves_the_image_on_its_port_with_ping_probes_and_one_worker_per_cpu():
    manifests = _by_kind("serve")
    deployment, service = manifests["Deployment"], manifests["Service"]
    autoscaler = manifests["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == SERVING_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/ping"
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["MLFLOW_MODELS_WORKERS"]) == int(container["resources"]["requests"]["cpu"])
    # The Service selects the pods and targets the named port; the autoscaler scales this Deployment.
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": deployment["metadata"]["name"]}
    assert "cpu" in container["resources"]["requests"]  # utilisation targets need a request


def test_kserve_services_are_inference_services_of_the_same_image_and_the_mlflow_model():
    container_schema = _part_validator("container-v1.json")
    resources_schema = _part_validator("resourcerequirements-v1.json")
    metadata_schema = _part_validator("objectmeta-meta-v1.json")
    deployment = _by_kind("serve")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    services = {path.stem: _documents(path)[0] for path in sorted((MANIFESTS / "kserve").glob("*.yaml"))}
    assert set(services) == {"inferenceservice-image", "inferenceservice-mlflow"}
    for doc in services.values():
        assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
        assert not list(metadata_schema.iter_errors(doc["metadata"]))
        assert set(doc["spec"]) == {"predictor"}
    image = services["inferenceservice-image"]["spec"]["predictor"]
    for container in image["containers"]:
        assert not list(container_schema.iter_errors(container)), container
        assert container["image"] == deployment["image"] and container["ports"][0]["containerPort"] == SERVING_PORT
        assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    model = services["inferenceservice-mlflow"]["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "mlflow" and model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith(("gs://", "s3://", "pvc://"))
    assert not list(resources_schema.iter_errors(model["resources"]))
