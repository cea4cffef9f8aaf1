"""The rendered manifests agree with the code, read the way a pod's process reads them.

For each Deployment, the service's own settings class is built from the container's
environment (ConfigMap values as rendered, Secrets as stand-ins, ``$(VAR)`` expanded): the
ports it would listen on must be the ports the container, its Services, its probes and the
NetworkPolicies name; every MHV_* variable must be one the code reads; files it would open
must be mounted; the peer it would call must be a Service with that port and a certificate
carrying the name it checks; the pod must have time to drain. A setting renamed or a default
changed in the code, or a manifest edited by hand, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from mhv_cli import main as mhv_main
from mhv_cli.migrate import SERVICE_SLICES, RoleNames
from mhv_common.config import (
    DEFAULT_RATE_LIMITS,
    AuditSettings,
    TaskSettings,
    WebhookSettings,
    load_webhook_sources,
)
from mhv_common.probes import LIVENESS
from mhv_tools.gen_rules import JOBS
from tests.deploy.support import Obj, container_env, named, of_kind, port_named

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"task": TaskSettings, "audit": AuditSettings, "webhook": WebhookSettings}
PORT_FIELDS = {
    "task": {"grpc": "task_grpc_port", "metrics": "task_metrics_port"},
    "audit": {"grpc": "audit_grpc_port", "metrics": "audit_metrics_port"},
    "webhook": {
        "grpc": "webhook_admin_grpc_port",
        "metrics": "webhook_metrics_port",
        "https": "webhook_https_port",
    },
}
# Whom each service calls: (callee, target setting, TLS name setting).
# Caller -> (callee, target setting, TLS name setting): the saga workers call the task service;
# the task and webhook outbox relays, the audit service.
CALLS = {
    ("task", "audit"): ("audit_target", "audit_tls_name"),
    ("webhook", "task"): ("task_target", "task_tls_name"),
    ("webhook", "audit"): ("audit_target", "audit_tls_name"),
    # The audit service asks the task service whether a person's user is still active.
    ("audit", "task"): ("task_target", "task_tls_name"),
}


def deployment(service: str) -> Obj:
    return named("Deployment", f"mahavishnu-{service}")


def the_container(service: str) -> Obj:
    (container,) = deployment(service)["spec"]["template"]["spec"]["containers"]
    return container


def settings_of(service: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's settings, built from its container's environment only."""
    import os

    for key in list(os.environ):
        if key.startswith("MHV_"):
            monkeypatch.delenv(key)
    for key, value in container_env(the_container(service)).items():
        monkeypatch.setenv(key, value)
    settings: BaseSettings = SETTINGS[service]()
    return settings


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_the_process_listens_where_the_manifests_say(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(service, monkeypatch)
    container = the_container(service)
    assert settings.bind_host == "0.0.0.0"  # noqa: S104 - reachable from other pods
    assert settings.metrics_host == "0.0.0.0"  # noqa: S104
    for port_name, field in PORT_FIELDS[service].items():
        assert port_named(container, port_name) == getattr(settings, field), port_name
    assert port_named(container, "health") == settings.health_port
    # Services route to named ports the container has.
    for svc in (
        named("Service", f"mahavishnu-{service}"),
        named("Service", f"mahavishnu-{service}-headless"),
    ):
        for port in svc["spec"]["ports"]:
            assert port["port"] == port_named(container, port["targetPort"]), port


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_probes_ask_the_health_listener_for_readiness_and_liveness(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(service, monkeypatch)
    container = the_container(service)
    for probe, health_name in (
        ("readinessProbe", ""),
        ("livenessProbe", LIVENESS),
        ("startupProbe", LIVENESS),
    ):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == settings.health_port, probe
        assert grpc.get("service", "") == health_name, probe


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_every_variable_is_one_the_code_reads(service: str) -> None:
    fields = {f"MHV_{f.upper()}" for f in SETTINGS[service].model_fields}
    declared = set()
    if service == "webhook":
        sources = load_webhook_sources(ROOT / "settings" / "webhooks.yaml")
        declared = {f"MHV_WEBHOOK_SECRETS_{s.name.upper()}" for s in sources}
    names = {e["name"] for e in the_container(service)["env"]}
    mhv = {n for n in names if n.startswith("MHV_")}
    assert mhv - fields - declared == set()
    # Every declared webhook sender gets its secret; none is missing.
    assert declared <= mhv


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_files_the_process_opens_are_mounted(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(service, monkeypatch)
    container = the_container(service)
    spec = deployment(service)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    paths = [v for v in settings.model_dump().values() if isinstance(v, Path)]
    query = parse_qs(urlsplit(getattr(settings, f"{service}_database_url")).query)
    paths.append(Path(query["sslrootcert"][0]))
    assert len(paths) >= 6
    for path in paths:
        folder = str(path.parent)
        assert folder in mounts, f"{path} is not in a mounted volume"
        volume = volumes[mounts[folder]]
        if "secret" in volume:
            secret = volume["secret"]
            keys = [i["path"] for i in secret.get("items", [])]
            # cert-manager's Secrets hold tls.crt, tls.key and ca.crt.
            assert path.name in (keys or ["tls.crt", "tls.key", "ca.crt"]), path
        elif volume["configMap"]["name"].startswith("mahavishnu-settings"):
            config_map = named("ConfigMap", "mahavishnu-settings")
            assert config_map["metadata"]["name"] == volume["configMap"]["name"]
            assert path.name in config_map["data"], path


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_the_database_url_names_the_services_own_role(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(service, monkeypatch)
    url = urlsplit(getattr(settings, f"{service}_database_url"))
    database = named("ConfigMap", "mahavishnu-database")["data"]
    assert url.username == RoleNames().for_slice(service)
    assert url.password == f"secret-mahavishnu-db-{service}-password"
    assert (url.hostname, str(url.port), url.path) == (
        database["host"],
        database["port"],
        f"/{database['name']}",
    )
    assert parse_qs(url.query)["sslmode"] == ["verify-full"]


@pytest.mark.parametrize(("caller", "callee"), sorted(CALLS))
def test_callers_reach_every_replica_of_a_callee_whose_certificate_has_the_checked_name(
    caller: str, callee: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target_field, name_field = CALLS[caller, callee]
    settings = settings_of(caller, monkeypatch)
    target = getattr(settings, target_field)
    assert target.startswith("dns:///")
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    service = named("Service", host)
    assert service["spec"]["clusterIP"] == "None", "callers balance over the headless Service"
    assert service["spec"]["selector"] == deployment(callee)["spec"]["selector"]["matchLabels"]
    assert int(port) == port_named(the_container(callee), "grpc")
    certificate = named("Certificate", f"mahavishnu-{callee}")
    assert getattr(settings, name_field) in certificate["spec"]["dnsNames"]
    volumes = deployment(callee)["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "grpc-tls",
        "secret": {"secretName": certificate["spec"]["secretName"], "defaultMode": 0o440},
    } in volumes
    # Both ends trust the same CA: the caller's CA file comes from a certificate of one issuer.
    issuers = {
        named("Certificate", f"mahavishnu-{s}")["spec"]["issuerRef"]["name"]
        for s in (caller, callee)
    }
    assert issuers == {"mahavishnu-ca"}


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_the_pod_has_time_to_drain(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # serve_forever: health NOT_SERVING, extra listeners finish (the webhook's HTTPS requests:
    # body timeout, then the acknowledgement deadline), the gRPC server's grace, then as long
    # again for the workers. All of it after the pre-stop pause, within the grace period.
    settings = settings_of(service, monkeypatch)
    container = the_container(service)
    drain = 2 * settings.shutdown_grace_seconds
    if service == "webhook":
        drain += settings.webhook_body_timeout_seconds + settings.default_deadline_seconds
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployment(service)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pause + drain < grace <= pause + drain + 10


def test_network_policies_open_the_ports_the_processes_listen_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policies = {p["metadata"]["name"]: p for p in of_kind("NetworkPolicy")}
    for service in SETTINGS:
        container = the_container(service)
        own = policies[f"mahavishnu-{service}"]
        ports = {p["port"] for rule in own["spec"]["ingress"] for p in rule["ports"]}
        expected = {"grpc", "metrics"} | ({"https"} if service == "webhook" else set())
        assert ports == expected
        for name in ports:
            port_named(container, name)
    # webhook -> task, task -> audit, webhook -> audit and audit -> task, each on the callee's
    # gRPC port.
    for caller, callee in CALLS:
        egress = policies[f"mahavishnu-{caller}"]["spec"]["egress"]
        to_callee = [
            r
            for r in egress
            if r["to"]
            == [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": f"mahavishnu-{callee}"}}}
            ]
        ]
        assert [p["port"] for r in to_callee for p in r["ports"]] == [
            port_named(the_container(callee), "grpc")
        ]
        ingress = policies[f"mahavishnu-{callee}"]["spec"]["ingress"]
        assert any(
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": f"mahavishnu-{caller}"}}}
            in r["from"]
            for r in ingress
        )
    # Nothing else: no service calls the gateway.
    assert "mahavishnu-webhook" not in str([p["spec"]["egress"] for p in policies.values()])


def test_the_webhook_edge_caps_bodies_as_the_gateway_does(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of("webhook", monkeypatch)
    # The file the pod reads is settings/webhooks.yaml (test_settings_files_reach_the_pods...).
    assert settings.webhooks_file.name == "webhooks.yaml"
    sources = {s.name: s for s in load_webhook_sources(ROOT / "settings" / "webhooks.yaml")}
    routes = of_kind("HTTPRoute")
    assert len(routes) == len(sources)
    policies = {p["spec"]["targetRefs"][0]["name"]: p for p in of_kind("BackendTrafficPolicy")}
    per_address = DEFAULT_RATE_LIMITS["webhook_unverified"].split("/")
    for route in routes:
        (rule,) = route["spec"]["rules"]
        (match,) = rule["matches"]
        source = sources[match["path"]["value"].removeprefix("/webhooks/")]
        (backend,) = rule["backendRefs"]
        assert backend == {"name": "mahavishnu-webhook", "port": settings.webhook_https_port}
        assert route["spec"]["hostnames"]
        edge = policies[route["metadata"]["name"]]["spec"]
        assert edge["requestBuffer"]["limit"] == source.body_cap_bytes
        (limit,) = edge["rateLimit"]["local"]["rules"]
        assert [str(limit["limit"]["requests"]), limit["limit"]["unit"].lower()] == per_address
    # Behind the Gateway the gateway's own per-address connection cap must be off.
    assert settings.webhook_max_connections_per_address == 0
    (tls,) = of_kind("BackendTLSPolicy")
    assert (
        tls["spec"]["validation"]["hostname"]
        in named("Certificate", "mahavishnu-webhook")["spec"]["dnsNames"]
    )
    assert settings.webhook_tls_cert_file == settings.grpc_tls_cert_file


def test_pod_monitors_give_the_job_names_the_rules_select() -> None:
    for service, job in JOBS.items():
        monitor = named("PodMonitor", f"mahavishnu-{service}")
        pods = deployment(service)["spec"]["template"]["metadata"]["labels"]
        assert pods[monitor["spec"]["jobLabel"]] == job
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pods.items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        port_named(the_container(service), endpoint["port"])


def test_migrate_job_runs_mhv_migrate_with_what_it_reads() -> None:
    job = named("Job", "mahavishnu-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["mhv", "migrate"]
    env = container_env(container)
    source = Path(mhv_main.__file__).read_text()
    names = {n for n in env if n.startswith("MHV_")}
    assert names == {
        "MHV_DATABASE_URL",
        "MHV_DB_ROLE_PREFIX",
        *(f"MHV_DB_PASSWORD_{s.upper()}" for s in SERVICE_SLICES),
    }
    for name in ("MHV_DATABASE_URL", "MHV_DB_ROLE_PREFIX", "MHV_DB_PASSWORD_"):
        assert f'"{name}' in source or f'f"{name}' in source, f"mhv no longer reads {name}"
    assert env["MHV_DB_ROLE_PREFIX"] == RoleNames().prefix
    for s in SERVICE_SLICES:
        # The password it sets on a role is the one that service logs in with.
        assert env[f"MHV_DB_PASSWORD_{s.upper()}"] == f"secret-mahavishnu-db-{s}-password"
    # The administrator URL lives only here, never in a service.
    for service in SETTINGS:
        assert "MHV_DATABASE_URL" not in container_env(the_container(service))
        assert "superuser" not in yaml.safe_dump(the_container(service))


def test_settings_files_reach_the_pods_unchanged() -> None:
    config_map = named("ConfigMap", "mahavishnu-settings")
    for name in ("repos.yaml", "webhooks.yaml"):
        assert config_map["data"][name] == (ROOT / "settings" / name).read_text()
    for service in SETTINGS:
        volumes = deployment(service)["spec"]["template"]["spec"]["volumes"]
        assert {
            "name": "settings",
            "configMap": {"name": config_map["metadata"]["name"]},
        } in volumes


def test_the_image_tag_is_the_projects_version() -> None:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert version is not None
    for service in SETTINGS:
        assert the_container(service)["image"].endswith(f":{version.group(1)}")
