"""Policy: every workload and container of the rendered manifests meets the production rules.

Containers: non-root, read-only root filesystem (writable paths only where declared),
no privilege escalation, every capability dropped, the runtime's seccomp profile, CPU and
memory requests and limits, the project's image. Pods: no service account token. Services:
at least two replicas spread over nodes and zones, native gRPC probes, a disruption budget,
an autoscaler, and time to drain.
"""

from __future__ import annotations

import pytest

from mhv_tools.gen_kubernetes import IMAGE_UID
from tests.deploy.support import Obj, of_kind, pod_templates

# Paths a container may write: declared emptyDir volumes, nothing else.
WRITABLE = {"/tmp"}


def containers() -> list[tuple[str, Obj, Obj]]:
    return [
        (f"{w['kind']}/{w['metadata']['name']}/{c['name']}", spec, c)
        for w, spec in pod_templates()
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    ]


def test_there_are_workloads_to_check() -> None:
    assert len(of_kind("Deployment")) == 3
    assert len(of_kind("Job")) == 1
    assert len(containers()) == 4


@pytest.mark.parametrize(
    ("where", "spec", "container"), containers(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_container_is_locked_down(where: str, spec: Obj, container: Obj) -> None:
    pod, ctx = spec.get("securityContext", {}), container.get("securityContext", {})

    def effective(key: str) -> object:
        return ctx.get(key, pod.get(key))

    assert effective("runAsNonRoot") is True, where
    assert effective("runAsUser") == IMAGE_UID, where
    assert ctx.get("allowPrivilegeEscalation") is False, where
    assert ctx.get("readOnlyRootFilesystem") is True, where
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
    assert not ctx.get("capabilities", {}).get("add"), where
    assert ctx.get("privileged", False) is False, where
    seccomp = effective("seccompProfile")
    assert isinstance(seccomp, dict) and seccomp.get("type") == "RuntimeDefault", where
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        assert set(resources.get(bound, {})) >= {"cpu", "memory"}, f"{where}: {bound}"
    image = container["image"]
    assert image.startswith("registry.mahavishnu.example/mahavishnu"), image


@pytest.mark.parametrize(
    ("where", "spec", "container"), containers(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_only_declared_paths_are_writable(where: str, spec: Obj, container: Obj) -> None:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount.get("readOnly"):
            continue
        assert mount["mountPath"] in WRITABLE, f"{where}: {mount['mountPath']} is writable"
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), where


@pytest.mark.parametrize(
    ("workload", "spec"),
    list(pod_templates()),
    ids=lambda v: v["metadata"]["name"] if "metadata" in v else "",
)
def test_no_service_account_token_is_mounted(workload: Obj, spec: Obj) -> None:
    assert spec.get("automountServiceAccountToken") is False
    accounts = {a["metadata"]["name"]: a for a in of_kind("ServiceAccount")}
    account = accounts[spec["serviceAccountName"]]
    assert account.get("automountServiceAccountToken") is False
    assert spec.get("hostNetwork", False) is False and spec.get("hostPID", False) is False


@pytest.mark.parametrize("deployment", of_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_every_service_is_replicated_spread_budgeted_and_scaled(deployment: Obj) -> None:
    name = deployment["metadata"]["name"]
    spec = deployment["spec"]
    pods = spec["selector"]["matchLabels"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    template = spec["template"]["spec"]
    spread = {c["topologyKey"]: c for c in template["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"] == pods
    budgets = [
        b for b in of_kind("PodDisruptionBudget") if b["spec"]["selector"]["matchLabels"] == pods
    ]
    assert len(budgets) == 1 and budgets[0]["spec"]["maxUnavailable"] == 1
    scalers = [
        h for h in of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(scalers) == 1
    assert scalers[0]["spec"]["minReplicas"] >= 2
    assert scalers[0]["spec"]["maxReplicas"] >= scalers[0]["spec"]["minReplicas"]
    (container,) = template["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in container[probe], f"{name}: {probe} is not a native gRPC probe"
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert (
        template["terminationGracePeriodSeconds"]
        > container["lifecycle"]["preStop"]["sleep"]["seconds"]
    )


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_network_policies_deny_by_default() -> None:
    deny = [p for p in of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1
    assert deny[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert deny[0]["spec"]["ingress"] == [] and deny[0]["spec"]["egress"] == []
    # Every other policy opens named flows to named peers: none allows "from anywhere".
    for policy in of_kind("NetworkPolicy"):
        for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]:
            assert rule.get("ports"), policy["metadata"]["name"]
