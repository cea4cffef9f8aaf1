"""The rendered production manifests, loaded once, and what the tests ask of them."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import yaml

from mhv_tools.gen_kubernetes import RENDERED

Obj = dict[str, Any]


@functools.cache
def objects() -> tuple[Obj, ...]:
    """Every object of deploy/kubernetes/rendered/mahavishnu.yaml."""
    return tuple(o for o in yaml.safe_load_all(RENDERED.read_text()) if o)


def of_kind(kind: str) -> list[Obj]:
    """The rendered objects of one kind."""
    return [o for o in objects() if o["kind"] == kind]


def named(kind: str, name: str) -> Obj:
    """The rendered object of `kind` whose name starts with `name` (generated ones get a hash)."""
    found = [
        o
        for o in of_kind(kind)
        if o["metadata"]["name"] == name
        or re.fullmatch(rf"{name}-[a-z0-9]{{10}}", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_templates() -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) for every Deployment and Job."""
    for workload in [*of_kind("Deployment"), *of_kind("Job")]:
        yield workload, workload["spec"]["template"]["spec"]


def container_env(container: Obj) -> dict[str, str]:
    """The environment a container's process sees, as the kubelet builds it.

    Values from ConfigMaps are the rendered ConfigMaps' values; values from Secrets (which
    the manifests never carry) are URL-safe stand-ins; ``$(VAR)`` expands from the variables
    listed before it, as Kubernetes does.
    """
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                item["value"],
            )
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            config_map = named("ConfigMap", ref["name"].rsplit("-", 1)[0])
            assert config_map["metadata"]["name"] == ref["name"]
            value = config_map["data"][ref["key"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = f"secret-{ref['name']}-{ref['key']}"
        env[item["name"]] = value
    return env


def port_named(container: Obj, name: str) -> int:
    """The container port called `name`."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name in ports, f"{container['name']} has no port named {name}"
    return int(ports[name])


def secret_names_referenced() -> set[str]:
    """Every Secret a pod or a custom object of the rendering reads."""
    found: set[str] = set()
    for _workload, spec in pod_templates():
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                found.add(volume["secret"]["secretName"])
        for container in spec["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.add(ref["name"])
    for issuer in of_kind("Issuer"):
        if "ca" in issuer["spec"]:
            found.add(issuer["spec"]["ca"]["secretName"])
    for policy in of_kind("BackendTLSPolicy"):
        for ref in policy["spec"]["validation"]["caCertificateRefs"]:
            if ref["kind"] == "Secret":
                found.add(ref["name"])
    for store in of_kind("ObjectStore"):
        for ref in store["spec"]["configuration"]["s3Credentials"].values():
            found.add(ref["name"])
    return found
