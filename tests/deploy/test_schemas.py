"""Every rendered object is valid: core kinds against the Kubernetes OpenAPI schema
(kubernetes-validate, strict), custom resources against their CRDs' published schemas
(deploy/kubernetes/schemas/, vendored with their sources)."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest

from mhv_tools.vendor_crds import schema_path
from tests.deploy.support import Obj, objects

# The oldest Kubernetes the manifests support (native gRPC probes GA in 1.27, the preStop
# sleep action on by default from 1.30) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def is_custom(obj: Obj) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return ("." in group and not group.endswith(".k8s.io")) or group == "gateway.networking.k8s.io"


def crd_schema(obj: Obj) -> dict[str, object]:
    group, _, version = obj["apiVersion"].rpartition("/")
    path = schema_path(group, obj["kind"], version)
    assert path.exists(), f"no vendored schema for {obj['apiVersion']} {obj['kind']}"
    schema: dict[str, object] = json.loads(path.read_text())
    return schema


def label(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schema(version: str) -> None:
    core = [o for o in objects() if not is_custom(o)]
    assert {"Deployment", "Service", "Job", "NetworkPolicy", "HorizontalPodAutoscaler"} <= {
        o["kind"] for o in core
    }
    errors = []
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{label(obj)}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_custom_objects_match_their_published_schemas() -> None:
    custom = [o for o in objects() if is_custom(o)]
    assert {
        "PodMonitor",
        "PrometheusRule",
        "Certificate",
        "Issuer",
        "Cluster",
        "ScheduledBackup",
        "ObjectStore",
        "HTTPRoute",
        "BackendTLSPolicy",
        "BackendTrafficPolicy",
    } <= {o["kind"] for o in custom}
    errors = []
    for obj in custom:
        validator = jsonschema.Draft7Validator(crd_schema(obj))
        errors += [
            f"{label(obj)}: {e.message} at {'.'.join(map(str, e.absolute_path))}"
            for e in validator.iter_errors(obj)
        ]
    assert not errors, "\n".join(errors)


def test_the_crd_schemas_reject_what_they_should() -> None:
    # The vendored schemas are not empty shells: an unknown enum value and a wrong type fail.
    certificate = next(o for o in objects() if o["kind"] == "Certificate")
    broken = json.loads(json.dumps(certificate))
    broken["spec"]["privateKey"]["algorithm"] = "DSA"
    broken["spec"]["dnsNames"] = "mahavishnu-task"
    assert len(list(jsonschema.Draft7Validator(crd_schema(broken)).iter_errors(broken))) == 2
