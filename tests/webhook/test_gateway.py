"""The real gateway process: concurrency from several client processes, fail-closed start-up,
TLS versions, the purge job, trace context, metrics and shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable
from pathlib import Path

import asyncpg
import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.auth import Role
from tests import retrying
from tests.conftest import Services
from tests.draining import assert_draining, health_status, locked, waiting_on_lock
from tests.harness import (
    ROOT,
    Deployment,
    Keys,
    bearer,
    metric,
    rpc_error,
    scrape,
    task_users_env,
)
from tests.waiting import wait_until
from tests.webhook.conftest import (
    GatewayProcess,
    Secrets,
    Tls,
    gateway_env,
    running_gateway,
)
from tests.webhook.signing import github_headers, standard_headers
from tests.webhook.support import assert_error

pytestmark = pytest.mark.slow


def _client(tls: Tls) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=tls.client_context(), timeout=30)


async def test_thousand_identical_deliveries_from_several_processes_make_one_row(
    gateway: GatewayProcess,
    tls: Tls,
    hook_secrets: Secrets,
    webhook_db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    body = json.dumps({"action": "opened", "issue": {"number": 7}, "n": uuid.uuid4().hex}).encode()
    delivery = str(uuid.uuid4())
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "headers": github_headers(hook_secrets.github, body, delivery=delivery),
                "body_hex": body.hex(),
            }
        )
    )
    processes, per_process = 4, 250
    senders = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.webhook.sender",
            f"{gateway.url}/webhooks/github",
            str(tls.cert),
            str(request),
            str(per_process),
            "50",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    statuses: list[int] = []
    for sender in senders:
        out, _ = await sender.communicate()
        assert sender.returncode == 0
        statuses += json.loads(out)
    assert len(statuses) == processes * per_process
    assert all(s in (200, 202) for s in statuses), sorted(set(statuses))
    assert statuses.count(202) == 1
    assert (
        await webhook_db.fetchval(
            "SELECT count(*) FROM deliveries WHERE source = 'github' AND delivery_id = $1", delivery
        )
        == 1
    )


async def test_purge_job_removes_only_expired_dedup_records(
    gateway: GatewayProcess, webhook_db: asyncpg.Connection
) -> None:
    expired, kept = f"purge-old-{uuid.uuid4()}", f"purge-new-{uuid.uuid4()}"
    await webhook_db.execute(
        "INSERT INTO dedup (source, key_kind, key, received_at) VALUES"
        " ('github', 'delivery_id', $1, now() - interval '4 days 1 minute'),"
        " ('github', 'delivery_id', $2, now() - interval '3 days 23 hours')",
        expired,
        kept,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not await webhook_db.fetchval("SELECT count(*) FROM dedup WHERE key = $1", expired):
            break
        await asyncio.sleep(0.2)
    assert await webhook_db.fetchval("SELECT count(*) FROM dedup WHERE key = $1", expired) == 0
    assert await webhook_db.fetchval("SELECT count(*) FROM dedup WHERE key = $1", kept) == 1


async def test_trace_context_and_metrics(
    gateway: GatewayProcess, tls: Tls, hook_secrets: Secrets, webhook_db: asyncpg.Connection
) -> None:
    body = json.dumps({"type": "issue.created", "n": uuid.uuid4().hex}).encode()
    msg_id = f"msg_{uuid.uuid4().hex}"
    trace_id = uuid.uuid4().hex
    headers = standard_headers(
        hook_secrets.generic, body, msg_id=msg_id, timestamp=int(time.time())
    )
    headers["traceparent"] = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    async with _client(tls) as client:
        response = await client.post(
            f"{gateway.url}/webhooks/generic", content=body, headers=headers
        )
        assert response.status_code == 202, response.text
        bad = await client.post(
            f"{gateway.url}/webhooks/generic",
            content=body,
            headers={**headers, "webhook-signature": "v1,AAAA"},
        )
        assert bad.status_code == 401
    row = await webhook_db.fetchrow(
        "SELECT event, traceparent FROM deliveries WHERE id = $1", uuid.UUID(response.json()["id"])
    )
    assert row["event"] == "issue.created"
    # Stored trace context continues the sender's trace.
    assert row["traceparent"].split("-")[1] == trace_id

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]  # KeyError: the series is missing

    # The gauges are refreshed every 0.5 s: wait for a refresh that saw this delivery.
    deadline = time.monotonic() + 15
    samples = await scrape(gateway.process.metrics_port)
    while time.monotonic() < deadline and not (
        samples.get(("webhook_inbox_depth", frozenset({("state", "pending")})), 0) >= 1
        and samples.get(("database_size_bytes", frozenset({("schema", "webhook")})), 0) > 0
    ):
        await asyncio.sleep(0.3)
        samples = await scrape(gateway.process.metrics_port)

    assert value("webhook_requests_total", code="202", source="generic") >= 1
    assert value("webhook_requests_total", code="401", source="generic") >= 1
    assert value("webhook_deliveries_total", outcome="accepted", source="generic") >= 1
    assert value("webhook_deliveries_total", outcome="bad_signature", source="generic") >= 1
    assert value("webhook_ack_duration_seconds_count", source="generic") >= 2
    assert value("webhook_secret_matches_total", key="0", source="generic") >= 1
    assert value("webhook_inbox_depth", state="pending") >= 1
    assert value("webhook_inbox_lag_seconds") >= 0
    assert value("database_size_bytes", schema="webhook") > 0


async def test_tls_1_2_is_the_minimum(gateway: GatewayProcess, tls: Tls) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = tls.client_context()
        ctx.minimum_version = ctx.maximum_version = version
        async with httpx.AsyncClient(verify=ctx) as client:
            assert (await client.get(f"{gateway.url}/healthz")).status_code == 200
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(tls.cert)
    # Lowering the security level lets this client offer TLS 1.0/1.1 at all, so the refusal
    # comes from the gateway (an alert or a closed connection), not from the client's own
    # "no protocols available".
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as refused:
        await asyncio.to_thread(_handshake, old, gateway.https_port)
    assert refused.value.reason in (
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNEXPECTED_EOF_WHILE_READING",
    ), refused.value
    # Plain HTTP on the TLS port gets no answer.
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"http://127.0.0.1:{gateway.https_port}/healthz")


def _handshake(ctx: ssl.SSLContext, port: int) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls_sock,
    ):
        tls_sock.do_handshake()


def _start_and_wait(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mhv_webhook"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def process_env(
    deployment: Deployment, keys: Keys, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> dict[str, str]:
    return gateway_env(deployment, keys, tls, hook_secrets, tmp_path)


def test_start_refused_without_a_secret(process_env: dict[str, str]) -> None:
    env = {k: v for k, v in process_env.items() if k != "MHV_WEBHOOK_SECRETS_GITLAB"}
    result = _start_and_wait(env)
    assert result.returncode == 1
    assert "MHV-001" in result.stderr and "MHV_WEBHOOK_SECRETS_GITLAB is not set" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MHV_WEBHOOK_SECRETS_GENERIC", "plain-text-secret-0123456789", "whsec_"),
        ("MHV_WEBHOOK_SECRETS_GITHUB", "s3cr3tX", "shorter than 16 bytes"),
        (
            "MHV_WEBHOOK_SECRETS_GITHUB",
            "0123456789abcdef0123;expires=2020-01-01T00:00:00Z",
            "every secret has expired",
        ),
        ("MHV_WEBHOOK_SECRETS_GITHUB", "0123456789abcdef0123;expires=soon", "ISO 8601"),
        ("MHV_WEBHOOK_TLS_CERT_FILE", "/nonexistent/cert.pem", "TLS certificate"),
    ],
)
def test_start_refused_with_unusable_configuration(
    process_env: dict[str, str], variable: str, value: str, message: str
) -> None:
    result = _start_and_wait({**process_env, variable: value})
    assert result.returncode == 1
    assert message in result.stderr
    # The secret itself never appears in the output.
    if variable.startswith("MHV_WEBHOOK_SECRETS_"):
        assert value.split(";")[0] not in result.stderr


def test_https_port_in_use_stops_the_process(process_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**process_env, "MHV_WEBHOOK_HTTPS_PORT": str(taken.getsockname()[1])}
        result = _start_and_wait(env)
    assert result.returncode != 0


async def test_sigterm_stops_cleanly(process_env: dict[str, str], tls: Tls, tmp_path: Path) -> None:
    async with running_gateway(process_env, tmp_path / "gw.log") as running:
        async with _client(tls) as client:
            assert (await client.get(f"{running.url}/healthz")).status_code == 200
        assert running.process.stop() == 0
    # Nothing listens any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.https_port), timeout=2).close()


async def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones_retryably(
    deployment: Deployment,
    keys: Keys,
    services: Services,
    tls: Tls,
    hook_secrets: Secrets,
    tmp_path: Path,
) -> None:
    # The admin API checks the person behind the token against the suite's task service.
    env = gateway_env(
        deployment,
        keys,
        tls,
        hook_secrets,
        tmp_path,
        **task_users_env(services.task.target, services.ca_file),
    )
    # Long enough that the drain never cuts the held request short, however busy the machine.
    env["MHV_SHUTDOWN_GRACE_SECONDS"] = "20"
    held, refused = str(uuid.uuid4()), str(uuid.uuid4())

    def delivery(client: httpx.AsyncClient, delivery_id: str) -> Awaitable[httpx.Response]:
        body = json.dumps({"action": "opened", "n": delivery_id}).encode()
        return client.post(
            f"{running.url}/webhooks/github",
            content=body,
            headers=github_headers(hook_secrets.github, body, delivery=delivery_id),
        )

    admin_token = bearer(keys.token(Role.ADMIN))
    async with running_gateway(env, tmp_path / "gw.log") as running:
        process = running.process.process
        assert process is not None
        async with (
            _client(tls) as client,
            _client(tls) as late_client,
            aio.insecure_channel(running.process.target) as channel,
        ):
            admin = webhook_pb2_grpc.WebhookAdminServiceStub(channel)
            async with locked(deployment, "webhook.deliveries"):
                in_flight = asyncio.ensure_future(delivery(client, held))
                listing = asyncio.ensure_future(
                    admin.ListDeliveries(
                        webhook_pb2.ListDeliveriesRequest(), metadata=admin_token, timeout=60
                    )
                )

                async def both_wait() -> bool:
                    return await waiting_on_lock(deployment, "webhook", at_least=2)

                await wait_until(both_wait, what="the request and the call wait on the lock")
                process.send_signal(signal.SIGTERM)

                async def not_serving() -> bool:
                    status = await health_status(channel)
                    return status == health_pb2.HealthCheckResponse.NOT_SERVING

                await wait_until(not_serving, what="health says NOT_SERVING")
                # New work is refused at once, retryably, on both listeners...
                answer = await delivery(late_client, refused)
                body = assert_error(answer, 503, "MHV-016")
                assert int(answer.headers["Retry-After"]) >= 1
                assert body["retry_after_seconds"] > 0
                assert_draining(
                    await rpc_error(
                        admin.ListDeliveries(
                            webhook_pb2.ListDeliveriesRequest(), metadata=admin_token, timeout=30
                        )
                    )
                )
                # ...while what was in progress goes on.
                assert not in_flight.done() and not listing.done()
            assert (await in_flight).status_code == 202
            await listing
        code = await asyncio.to_thread(process.wait, running.process.drain_seconds)
        assert code == 0, running.process.logs()[-3000:]
    stored = await deployment.fetch(
        "SELECT delivery_id FROM webhook.deliveries WHERE delivery_id = ANY($1::text[])",
        [held, refused],
    )
    assert [r["delivery_id"] for r in stored] == [held]


async def test_load_over_the_bound_is_shed_with_503_and_retry_after_then_served(
    deployment: Deployment, keys: Keys, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> None:
    bound = 2
    env = gateway_env(deployment, keys, tls, hook_secrets, tmp_path, MHV_MAX_IN_FLIGHT=str(bound))
    ids = [str(uuid.uuid4()) for _ in range(bound + 5 * bound)]
    async with running_gateway(env, tmp_path / "gw.log") as running, _client(tls) as client:

        def delivery(n: int) -> tuple[str, bytes, dict[str, str]]:
            body = json.dumps({"action": "opened", "n": ids[n]}).encode()
            headers = github_headers(hook_secrets.github, body, delivery=ids[n])
            return f"{running.url}/webhooks/github", body, headers

        def send(n: int) -> Awaitable[httpx.Response]:
            url, body, headers = delivery(n)
            return client.post(url, content=body, headers=headers)

        async with locked(deployment, "webhook.deliveries"):
            held = [asyncio.ensure_future(send(n)) for n in range(bound)]

            async def bound_filled() -> bool:
                labels = {"service": "webhook", "listener": "https"}
                port = running.process.metrics_port
                return await metric(port, "admission_in_flight", labels) >= bound

            await wait_until(bound_filled, what="the bound is filled with requests in flight")
            for answer in await asyncio.gather(*(send(n) for n in range(bound, len(ids)))):
                assert_error(answer, 503, "MHV-017")
                assert int(answer.headers["Retry-After"]) >= 1
            assert not any(request.done() for request in held)
        assert [(await request).status_code for request in held] == [202] * bound
        # Recovered: a shed delivery sent again, as its sender would, is accepted.
        url, body, headers = delivery(bound)
        assert (await retrying.post(client, url, content=body, headers=headers)).status_code == 202
    stored = await deployment.fetch(
        "SELECT delivery_id FROM webhook.deliveries WHERE delivery_id = ANY($1::text[])", ids
    )
    # Held and resent deliveries stored once each; nothing of the shed ones.
    assert sorted(r["delivery_id"] for r in stored) == sorted(ids[: bound + 1])
