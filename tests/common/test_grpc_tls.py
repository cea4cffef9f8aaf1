"""gRPC over TLS: what the services accept, what they refuse, and what they refuse to start with.

The session's services (tests/conftest.py) serve TLS only with certificates from a private CA,
and call each other over TLS; every test that talks to them shows the happy path. Here: the
ways in that must stay shut, and the configurations a service must not start with.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.devstate import DevState
from mhv_common.auth import Role
from mhv_common.client import Peer, service_channel
from mhv_common.config import CommonSettings
from mhv_common.server import RunningService, ServiceDefinition
from mhv_common.tls import channel_credentials, is_loopback
from tests.conftest import Services
from tests.harness import Deployment, Keys, anyone_active, bearer, grpc_channel, service_env
from tests.loglines import has_record

GRPCURL = Path(sys.executable).parent / "grpcurl"


async def _health(channel: aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(reply.status)


@pytest.mark.parametrize("name", ["task", "audit", "webhook"])
async def test_each_service_answers_over_tls_only(services: Services, name: str) -> None:
    target = getattr(services, name).target
    async with grpc_channel(target, services.ca_file) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    async with aio.insecure_channel(target) as channel:
        with pytest.raises(aio.AioRpcError) as refused:
            await _health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_not_trusted(
    services: Services, keys: Keys, tmp_path: Path
) -> None:
    other = DevState(tmp_path)
    other.ensure_grpc_tls()
    async with grpc_channel(services.task.target, other.grpc_ca) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as refused:
            # The token never leaves: the handshake fails before any request is sent.
            await stub.ListTasks(
                task_pb2.ListTasksRequest(), metadata=bearer(keys.token(Role.ADMIN)), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("name", "accepted"), [("mahavishnu-webhook", True), ("mahavishnu-audit", False)]
)
async def test_a_service_cannot_pose_as_another(
    services: Services, name: str, accepted: bool
) -> None:
    # The webhook gateway's certificate, from the same CA, on a loopback address its
    # certificate names: a caller expecting the audit service still refuses it.
    tls = channel_credentials(services.ca_file)
    assert tls is not None
    async with service_channel(Peer(services.webhook.target, tls, name)) as channel:
        if accepted:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        else:
            with pytest.raises(aio.AioRpcError) as refused:
                await _health(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_needs_the_ca(services: Services) -> None:
    def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(GRPCURL), *args, services.task.target, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    trusted = grpcurl("-cacert", str(services.ca_file))
    assert trusted.returncode == 0, trusted.stderr
    assert "mahavishnu.task.v1.TaskService" in trusted.stdout
    assert grpcurl("-plaintext").returncode != 0
    # Without the CA, the system trust store does not know the private CA.
    unknown = grpcurl()
    assert unknown.returncode != 0
    assert "certificate" in unknown.stderr


def _leaf(state: DevState, service: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(state.grpc_cert(service).read_bytes())


def test_each_service_has_its_own_key_and_name(tmp_path: Path) -> None:
    state = DevState(tmp_path)
    state.ensure_grpc_tls()
    keys = {state.grpc_key(s).read_bytes() for s in ("task", "audit", "webhook")}
    assert len(keys) == 3
    names = _leaf(state, "audit").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "mahavishnu-audit" in names.value.get_values_for_type(x509.DNSName)
    assert "mahavishnu-task" not in names.value.get_values_for_type(x509.DNSName)
    # A second run keeps what exists: certificates stay valid across restarts.
    before = state.grpc_cert("task").read_bytes()
    state.ensure_grpc_tls()
    assert state.grpc_cert("task").read_bytes() == before
    assert oct(state.grpc_key("task").stat().st_mode & 0o777) == "0o600"


def test_certificates_of_another_ca_are_reissued(tmp_path: Path) -> None:
    state = DevState(tmp_path)
    state.ensure_grpc_tls()
    old_ca = state.grpc_ca.read_bytes()
    # The CA is lost (or replaced): the next start makes a new one, and no certificate of the
    # old one is kept, since the new CA's clients would refuse it.
    state.grpc_ca_key.unlink()
    state.ensure_grpc_tls()
    assert state.grpc_ca.read_bytes() != old_ca
    ca = x509.load_pem_x509_certificate(state.grpc_ca.read_bytes())
    for service in ("task", "audit", "webhook"):
        _leaf(state, service).verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("10.0.0.5", False),
        ("task.internal", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.fixture(scope="module")
def tls_state(tmp_path_factory: pytest.TempPathFactory) -> DevState:
    state = DevState(Path(tmp_path_factory.mktemp("grpc-tls-config")))
    state.ensure_grpc_tls()
    return state


def _encrypted_copy(key_file: Path, folder: Path) -> str:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    path = folder / "encrypted-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return str(path)


def _bad_pem(tmp_path: Path) -> str:
    path = tmp_path / "not-a-ca.pem"
    path.write_text("not a certificate\n")
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cert without key", "go together"),
        ("cert with another service's key", "one key pair"),
        # Refused, not a passphrase prompt on a terminal nobody watches.
        ("encrypted key", "one key pair"),
        ("plaintext on every interface", "without TLS"),
        ("unreadable CA", "gRPC CA file"),
        ("serving TLS, calling in plaintext", "would call 127.0.0.1:1 in plaintext"),
        ("plaintext call across the network", "would cross the network in plaintext"),
    ],
)
def test_start_refused_with_unusable_transport_settings(
    deployment: Deployment,
    keys: Keys,
    tls_state: DevState,
    tmp_path: Path,
    case: str,
    message: str,
) -> None:
    ca = {"MHV_GRPC_TLS_CA_FILE": str(tls_state.grpc_ca)}
    settings = {
        "cert without key": {**ca, "MHV_GRPC_TLS_CERT_FILE": str(tls_state.grpc_cert("task"))},
        "cert with another service's key": {
            **ca,
            "MHV_GRPC_TLS_CERT_FILE": str(tls_state.grpc_cert("task")),
            "MHV_GRPC_TLS_KEY_FILE": str(tls_state.grpc_key("audit")),
        },
        "encrypted key": {
            **ca,
            "MHV_GRPC_TLS_CERT_FILE": str(tls_state.grpc_cert("task")),
            "MHV_GRPC_TLS_KEY_FILE": _encrypted_copy(tls_state.grpc_key("task"), tmp_path),
        },
        "plaintext on every interface": {"MHV_BIND_HOST": "0.0.0.0"},  # noqa: S104
        "unreadable CA": {"MHV_GRPC_TLS_CA_FILE": _bad_pem(tmp_path)},
        "serving TLS, calling in plaintext": {
            "MHV_GRPC_TLS_CERT_FILE": str(tls_state.grpc_cert("task")),
            "MHV_GRPC_TLS_KEY_FILE": str(tls_state.grpc_key("task")),
        },
        "plaintext call across the network": {"MHV_AUDIT_TARGET": "audit.internal:50052"},
    }[case]
    env = service_env(deployment, keys, {"MHV_TASK_GRPC_PORT": "0", **settings})
    result = subprocess.run(
        [sys.executable, "-m", "mhv_task"],
        env={**env, "MHV_TASK_METRICS_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "MHV-001" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


async def test_plaintext_elsewhere_only_when_allowed(deployment: Deployment, keys: Keys) -> None:
    # The explicit opt-out (a trusted proxy does TLS) starts, on every interface and with a
    # relay target beyond loopback; SIGTERM stops it cleanly.
    env = service_env(
        deployment,
        keys,
        {
            "MHV_BIND_HOST": "0.0.0.0",  # noqa: S104
            "MHV_GRPC_ALLOW_PLAINTEXT": "true",
            "MHV_AUDIT_TARGET": "audit.internal:50052",
            "MHV_TASK_GRPC_PORT": "0",
            "MHV_TASK_METRICS_PORT": "0",
        },
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mhv_task",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None

        async def started() -> bytes:
            assert process.stdout is not None
            async for line in process.stdout:
                if has_record(line, msg="service started"):
                    return line
            return b""

        assert has_record(await asyncio.wait_for(started(), timeout=60), grpc_tls=False)
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0


async def test_a_connection_that_never_says_hello_is_closed(keys: Keys, tmp_path: Path) -> None:
    # grpc core's own bound (GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS) is 120 s; the services set
    # MHV_GRPC_HANDSHAKE_TIMEOUT_SECONDS (here 0.5 s).
    state = DevState(tmp_path)
    state.ensure_grpc_tls(("probe",))

    def register(_server: aio.Server) -> list[str]:
        return []

    service = RunningService(
        ServiceDefinition(
            name="probe",
            grpc_port=0,
            metrics_port=None,
            register=register,
            policies={},
            revocation=anyone_active(),
        ),
        CommonSettings(
            auth_jwks_file=keys.jwks,
            grpc_tls_cert_file=state.grpc_cert("probe"),
            grpc_tls_key_file=state.grpc_key("probe"),
            grpc_handshake_timeout_seconds=0.5,
            shutdown_grace_seconds=0.5,
        ),
    )
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.grpc_port)
        try:
            # Nothing is sent: grpc closes the connection once the bound has passed.
            assert await asyncio.wait_for(reader.read(1), 30) == b""
        except ConnectionError:
            pass
        finally:
            writer.close()
        # A client that does shake hands is served as before.
        async with grpc_channel(f"127.0.0.1:{service.grpc_port}", state.grpc_ca) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop()
