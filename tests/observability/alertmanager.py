"""A real Alertmanager for tests, with the deployed config pointed at local receivers.

`render_local_config` keeps the deployed routing tree, inhibition rules and receivers, and
changes only where they deliver: every secret path under /etc/alertmanager/secrets/ becomes the
same file name in a test folder, every endpoint becomes a listener on 127.0.0.1, email trusts
the test certificate, and waits shrink to a second so that a test needs no minutes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from mhv_cli.pgcluster import free_port
from tests.observability.tools import ALERTMANAGER_CONFIG, Daemon, tool

SECRETS_DIR = "/etc/alertmanager/secrets/"


def load_config(path: Path = ALERTMANAGER_CONFIG) -> dict[str, Any]:
    """The deployed Alertmanager configuration."""
    return dict(yaml.safe_load(path.read_text()))


def walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) pair of a YAML tree, depth first."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield (*path, str(key)), value
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, str(index)))


def secret_files(config: Mapping[str, Any]) -> set[str]:
    """File names of every secret the config reads (`*_file` settings)."""
    return {
        Path(value).name
        for keys, value in walk(config)
        if keys[-1].endswith("_file") and isinstance(value, str) and value.startswith(SECRETS_DIR)
    }


@dataclass(frozen=True)
class LocalEndpoints:
    """Where a rendered config delivers."""

    secrets_dir: Path
    smtp_port: int
    smtp_ca_file: Path
    pagerduty_url: str
    heartbeat_url: str


def _retime(route: dict[str, Any]) -> None:
    for key in ("group_wait", "group_interval", "repeat_interval"):
        if key in route:
            route[key] = "1s" if key != "repeat_interval" else "1h"
    for child in route.get("routes", []):
        _retime(child)


def render_local_config(config: Mapping[str, Any], endpoints: LocalEndpoints) -> dict[str, Any]:
    """`config` delivering to `endpoints` (see the module docstring)."""
    rendered = copy.deepcopy(dict(config))
    for keys, value in list(walk(rendered)):
        if keys[-1].endswith("_file") and isinstance(value, str) and value.startswith(SECRETS_DIR):
            parent: Any = rendered
            for key in keys[:-1]:
                parent = parent[int(key)] if isinstance(parent, list) else parent[key]
            parent[keys[-1]] = str(endpoints.secrets_dir / Path(value).name)
    glob = rendered["global"]
    glob["smtp_smarthost"] = f"127.0.0.1:{endpoints.smtp_port}"
    glob["pagerduty_url"] = endpoints.pagerduty_url
    for receiver in rendered["receivers"]:
        for email in receiver.get("email_configs", []):
            email["tls_config"] = {"ca_file": str(endpoints.smtp_ca_file)}
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = endpoints.heartbeat_url
    rendered["route"]["group_wait"] = "1s"
    _retime(rendered["route"])
    return rendered


class Alertmanager(Daemon):
    """Alertmanager on a free port, with temporary storage and clustering off."""

    def __init__(self, config: Mapping[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                tool("alertmanager"),
                f"--config.file={self.config_path}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                # An empty address turns gossip off: no cluster port to collide on.
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            workdir / "alertmanager.log",
            f"{self.url}/-/ready",
        )

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Send alerts through the v2 API, as Prometheus does."""
        response = httpx.post(f"{self.url}/api/v2/alerts", json=list(alerts), timeout=10)
        response.raise_for_status()

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert Alertmanager holds, with its state (active, suppressed)."""
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=10)
        response.raise_for_status()
        return list(response.json())
