"""Rotating credentials from the command line, as the security incident runbook does it."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from google.protobuf import json_format

from mahavishnu.audit.v1 import audit_pb2
from mhv_cli.credentials import rotated
from mhv_cli.devstate import DevState, role_url
from mhv_cli.main import main
from mhv_cli.migrate import RoleNames
from mhv_common.auth import Role, TokenIssuer, TokenVerifier
from mhv_common.errors import AuthenticationError
from mhv_webhook._secrets import parse_secrets
from tests.audit.support import list_all, verify
from tests.audit.support import stub as audit_stub
from tests.conftest import Services
from tests.harness import Cluster, Deployment, Keys, grpc_channel, make_person
from tests.seed import scratch_database


def mhv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mhv` as its own process, as an operator runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
    return subprocess.run(
        [str(Path(sys.executable).with_name("mhv")), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class Operator:
    """An administrator running `mhv` against the session's audit service."""

    user_id: str
    env: dict[str, str]


@pytest.fixture
async def operator(services: Services, keys: Keys, deployment: Deployment) -> Operator:
    # An existing user: the audit service refuses a person whose user does not exist.
    user_id = await make_person(deployment, "operator")
    return Operator(
        user_id,
        {
            "MHV_TOKEN": keys.token(Role.ADMIN, subject=user_id),
            "MHV_AUDIT_TARGET": services.audit.target,
            "MHV_GRPC_TLS_CA_FILE": str(services.ca_file),
        },
    )


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, operator: Operator
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`mhv` in this process, as `operator`: its whole command line code, without a process."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        for name in [k for k in os.environ if k.startswith("MHV_")]:
            monkeypatch.delenv(name)
        for name, value in {**operator.env, **(env or {})}.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def test_signing_key_rotation_revokes_the_compromised_key(
    tmp_path: Path, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    jwks = tmp_path / "jwks.json"
    old_key, new_key = tmp_path / "admin-1.pem", tmp_path / "admin-2.pem"
    for kid, path in (("admin-1", old_key), ("admin-2", new_key)):
        made = cli("keys", "generate", "--kid", kid, "--private-key", str(path))
        assert made.returncode == 0, made.stderr
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        (tmp_path / f"{kid}.jwk").write_text(made.stdout)
        assert json.loads(made.stdout)["kid"] == kid
    assert (
        cli("keys", "jwks", "--file", str(jwks), "--add", str(tmp_path / "admin-1.jwk")).returncode
        == 0
    )
    old_token = TokenIssuer.from_file(old_key, key_id="admin-1").issue(subject="u", roles=["admin"])
    assert TokenVerifier(json.loads(jwks.read_text())).verify(old_token)

    # The compromise: add the new key and remove the old one in one step.
    done = cli(
        "keys",
        "jwks",
        "--file",
        str(jwks),
        "--add",
        str(tmp_path / "admin-2.jwk"),
        "--remove",
        "admin-1",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{jwks}: admin-2"
    verifier = TokenVerifier(json.loads(jwks.read_text()))
    new_token = TokenIssuer.from_file(new_key, key_id="admin-2").issue(subject="u", roles=["admin"])
    assert verifier.verify(new_token)
    with pytest.raises(AuthenticationError):
        verifier.verify(old_token)

    # A key is never overwritten, and a JWKS is never left empty.
    again = cli("keys", "generate", "--kid", "admin-2", "--private-key", str(new_key))
    assert again.returncode == 1
    assert "is never overwritten" in again.stderr
    empty = cli("keys", "jwks", "--file", str(jwks), "--remove", "admin-2")
    assert empty.returncode == 1
    assert "[MHV-001]" in empty.stderr


def test_webhook_secret_rotation_overlaps_then_retires_the_old_secret() -> None:
    now = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    current = "a" * 64 + ";id=k1"
    value = rotated("github", current, overlap_hours=24, now=now)
    entries = parse_secrets("github", value)
    assert [e.label for e in entries] == ["k202605011200", "k1"]
    assert entries[1].key == ("a" * 64).encode()
    assert entries[1].expires_at == (now + dt.timedelta(hours=24)).timestamp()
    assert entries[0].expires_at is None
    # A leaked secret: no overlap, the old one is gone at once.
    leaked = parse_secrets("github", rotated("github", current, overlap_hours=0, now=now))
    assert [e.label for e in leaked] == ["k202605011200"]
    # A Standard Webhooks source gets a signing key again.
    generic = rotated("generic", "whsec_" + "A" * 44, overlap_hours=1, now=now)
    assert generic.startswith("whsec_")
    assert parse_secrets("generic", generic)[0].signing_key


def test_rotate_webhook_secret_of_the_local_deployment(
    tmp_path: Path, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    state = DevState(tmp_path)
    before = state.secrets()["webhook_secrets"]["github"]
    done = cli("secrets", "rotate-webhook", "--source", "github", env={"MHV_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    after = state.secrets()["webhook_secrets"]["github"]
    newest = done.stdout.splitlines()[-1]
    assert after.startswith(newest + ";id=k")
    assert f", {before};expires=" in after
    assert [e.key for e in parse_secrets("github", after)] == [newest.encode(), before.encode()]
    printed = cli(
        "secrets",
        "rotate-webhook",
        "--source",
        "gitlab",
        "--current",
        "b" * 40,
        "--overlap-hours",
        "0",
        env={"MHV_HOME": str(tmp_path)},
    )
    assert printed.returncode == 0
    assert printed.stdout.startswith("MHV_WEBHOOK_SECRETS_GITLAB=")
    assert "b" * 40 not in printed.stdout


@pytest.fixture
async def service_role(cluster: Cluster) -> AsyncIterator[tuple[str, RoleNames]]:
    passwords = {"task": "old-password-1"}
    async with scratch_database(cluster.admin_url, "mhvcred", passwords=passwords) as created:
        yield created


def scram_matches(verifier: str, password: str) -> bool:
    """Whether a PostgreSQL SCRAM-SHA-256 verifier (pg_authid.rolpassword) is `password`'s."""
    method, rest = verifier.split("$", 1)
    iterations, salt = rest.split("$", 1)[0].split(":")
    stored_key = rest.split("$", 1)[1].split(":")[0]
    assert method == "SCRAM-SHA-256"
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


async def test_database_password_rotation_ends_the_leaked_sessions(
    service_role: tuple[str, RoleNames], operator: Operator
) -> None:
    url, roles = service_role
    role = roles.for_slice("task")
    admin = await asyncpg.connect(url)
    try:
        verifier = "SELECT rolpassword FROM pg_authid WHERE rolname = $1"
        assert scram_matches(await admin.fetchval(verifier, role), "old-password-1")
        leaked = role_url(url, role, "old-password-1")
        intruder = await asyncpg.connect(leaked)
        done = mhv(
            "secrets",
            "rotate-db-password",
            "--slice",
            "task",
            env={**operator.env, "MHV_DATABASE_URL": url, "MHV_DB_ROLE_PREFIX": roles.prefix},
        )
        assert done.returncode == 0, done.stderr
        assert f"{role}: new password set, 1 session(s) ended" in done.stderr
        password = done.stdout.strip().removeprefix("MHV_DB_PASSWORD_TASK=")
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await intruder.fetchval("SELECT 1")
        stored = await admin.fetchval(verifier, role)
        assert scram_matches(stored, password)
        assert not scram_matches(stored, "old-password-1")
        fresh = await asyncpg.connect(role_url(url, role, password))
        assert await fresh.fetchval("SELECT current_user") == role
        await fresh.close()
    finally:
        await admin.close()


async def _audited(
    services: Services, keys: Keys, operator: Operator
) -> list[audit_pb2.AuditEvent]:
    """The credential events recorded as `operator`, oldest first (recorded before returning)."""
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        audit = audit_stub(channel)
        found = await list_all(
            audit,
            keys,
            subject_kind="credential",
            user_id=operator.user_id,
            order=audit_pb2.ORDER_OLDEST_FIRST,
        )
        assert (await verify(audit, keys)).ok
    return found


async def run(
    cli: Callable[..., subprocess.CompletedProcess[str]], *args: str, **env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`cli` off the event loop: its commands run their own (``asyncio.run``)."""
    return await asyncio.to_thread(cli, *args, **env)


async def test_every_credential_command_is_audited_once_as_its_operator_without_secrets(
    tmp_path: Path,
    cli: Callable[..., subprocess.CompletedProcess[str]],
    operator: Operator,
    services: Services,
    keys: Keys,
    service_role: tuple[str, RoleNames],
) -> None:
    key = tmp_path / "ops-1.pem"
    made = await run(cli, "keys", "generate", "--kid", "ops-1", "--private-key", str(key))
    assert made.returncode == 0, made.stderr
    (tmp_path / "ops-1.jwk").write_text(made.stdout)
    jwks = tmp_path / "jwks.json"
    jwk = str(tmp_path / "ops-1.jwk")
    published = await run(cli, "keys", "jwks", "--file", str(jwks), "--add", jwk)
    assert published.returncode == 0, published.stderr
    home = {"MHV_HOME": str(tmp_path)}
    DevState(tmp_path).secrets()  # the local deployment's secrets, as `mhv up` makes them
    rotated_local = await run(cli, "secrets", "rotate-webhook", "--source", "github", env=home)
    assert rotated_local.returncode == 0, rotated_local.stderr
    printed = await run(
        cli, "secrets", "rotate-webhook", "--source", "gitlab", "--current", "c" * 40
    )
    assert printed.returncode == 0, printed.stderr
    url, roles = service_role
    rotated_db = await run(
        cli,
        "secrets",
        "rotate-db-password",
        "--slice",
        "task",
        env={"MHV_DATABASE_URL": url, "MHV_DB_ROLE_PREFIX": roles.prefix},
    )
    assert rotated_db.returncode == 0, rotated_db.stderr
    events = await _audited(services, keys, operator)
    assert [(e.event_type, e.subject_id) for e in events] == [
        ("signing_key_generated", "signing-key:ops-1"),
        ("jwks_published", "jwks:jwks.json"),
        ("webhook_secret_rotated", "webhook-secret:github"),
        ("webhook_secret_rotated", "webhook-secret:gitlab"),
        ("db_password_rotated", f"db-password:{roles.for_slice('task')}"),
    ]
    assert {(e.subject_kind, e.user_id, e.task_id) for e in events} == {
        ("credential", operator.user_id, 0)
    }
    recorded = "".join(json_format.MessageToJson(e) for e in events)
    secrets_now = DevState(tmp_path).secrets()["webhook_secrets"]["github"]
    for secret in (
        key.read_text().splitlines()[1],  # the private key's body
        secrets_now.split(";")[0],  # the new webhook secret
        printed.stdout.split("=", 1)[1].split(";")[0],
        rotated_db.stdout.strip().removeprefix("MHV_DB_PASSWORD_TASK="),
        operator.env["MHV_TOKEN"],
    ):
        assert secret not in recorded


async def test_a_command_that_cannot_record_changes_nothing(
    tmp_path: Path,
    cli: Callable[..., subprocess.CompletedProcess[str]],
    operator: Operator,
    services: Services,
    keys: Keys,
) -> None:
    key = tmp_path / "never.pem"
    home = {"MHV_HOME": str(tmp_path)}
    state = DevState(tmp_path)
    state.secrets()
    before = state.secrets_file.read_text()
    for env in ({"MHV_TOKEN": ""}, {"MHV_AUDIT_TARGET": "127.0.0.1:1"}):
        refused = await run(
            cli, "keys", "generate", "--kid", "never", "--private-key", str(key), env=env
        )
        assert refused.returncode == 1
        assert "[MHV-401]" in refused.stderr and "nothing was changed" in refused.stderr.lower()
        assert not key.exists() and refused.stdout == ""
        webhook = await run(
            cli, "secrets", "rotate-webhook", "--source", "github", env={**home, **env}
        )
        assert webhook.returncode == 1 and "[MHV-401]" in webhook.stderr
        assert state.secrets_file.read_text() == before
    # A viewer may not record: the audit service refuses, the command changes nothing.
    viewer = await run(
        cli,
        "keys",
        "generate",
        "--kid",
        "never",
        "--private-key",
        str(key),
        env={"MHV_TOKEN": keys.token(Role.VIEWER, subject=operator.user_id)},
    )
    assert viewer.returncode == 1 and "PERMISSION_DENIED" in viewer.stderr
    assert not key.exists()
    assert await _audited(services, keys, operator) == []
    # Before a deployment has an audit service: an explicit, announced exception.
    bootstrap = await run(
        cli,
        "keys",
        "generate",
        "--kid",
        "first",
        "--private-key",
        str(key),
        "--no-audit",
        env={"MHV_TOKEN": ""},
    )
    assert bootstrap.returncode == 0 and key.exists()
    assert "NOT recorded in the audit log" in bootstrap.stderr
