"""Every Secret the manifests read is created by them, by an operator they declare, or listed
in docs/deploy/kubernetes.md for the installer to create; none is ever written in them."""

from __future__ import annotations

import re
from pathlib import Path

from tests.deploy.support import of_kind, secret_names_referenced

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy" / "kubernetes.md"


def created_by_the_manifests() -> set[str]:
    made = {c["spec"]["secretName"] for c in of_kind("Certificate")}
    for cluster in of_kind("Cluster"):  # CloudNativePG: the server CA and the superuser
        name = cluster["metadata"]["name"]
        made |= {f"{name}-ca", f"{name}-superuser"}
    return made


def documented() -> set[str]:
    section = DOC.read_text().split("## Secrets and configuration you create", 1)[1]
    table = section.split("\n\n", 2)[2].split("\n\n", 1)[0]
    return set(re.findall(r"`(mahavishnu-[a-z0-9-]+)`", table))


def test_every_secret_read_is_created_or_documented() -> None:
    missing = secret_names_referenced() - created_by_the_manifests() - documented()
    assert not missing, f"document these in {DOC.name}: {sorted(missing)}"


def test_the_documented_table_names_nothing_that_is_not_used() -> None:
    used = secret_names_referenced() | {"mahavishnu-jwks", "mahavishnu-alertmanager-receivers"}
    assert documented() - used == set()


def test_no_secret_carries_data_in_the_manifests() -> None:
    # The only Secret rendered is Alertmanager's configuration, which holds paths to secrets.
    secrets = of_kind("Secret")
    assert [s["metadata"]["name"] for s in secrets] == ["alertmanager-mahavishnu"]
    assert "data" not in secrets[0]
