"""Service channels: round robin over every replica of the callee, with its name still checked."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from mhv_common.client import Peer, service_channel, target_hosts
from mhv_common.config import CommonSettings
from mhv_common.errors import ConfigurationError
from mhv_common.interceptors import MethodPolicy
from mhv_common.server import RunningService, ServiceDefinition
from mhv_common.tls import channel_credentials, peer
from tests.harness import Keys, anyone_active

# Two replicas on two loopback addresses, as two hosts would be.
ADDRESSES = ("127.0.0.1", "127.0.0.2")


@pytest.mark.parametrize(
    ("target", "hosts"),
    [
        ("127.0.0.1:50051", ["127.0.0.1"]),
        ("localhost:50051", ["localhost"]),
        ("[::1]:50051", ["::1"]),
        ("dns:///mahavishnu-task.mahavishnu.svc:50051", ["mahavishnu-task.mahavishnu.svc"]),
        ("dns://10.0.0.10/task.internal:50051", ["task.internal"]),
        ("dns:task.internal:50051", ["task.internal"]),
        ("ipv4:10.0.0.7:50051,10.0.0.8:50051", ["10.0.0.7", "10.0.0.8"]),
        ("ipv6:[::1]:50051,[fd00::8]:50051", ["::1", "fd00::8"]),
        ("unix:/run/mahavishnu/task.sock", ["localhost"]),
    ],
)
def test_target_hosts(target: str, hosts: list[str]) -> None:
    assert target_hosts(target) == hosts


def test_plaintext_only_when_every_replica_is_on_loopback() -> None:
    settings = CommonSettings()
    assert peer(settings, "ipv4:127.0.0.1:1,127.0.0.2:1", "mahavishnu-audit").tls is None
    with pytest.raises(ConfigurationError, match="cross the network in plaintext"):
        peer(settings, "ipv4:127.0.0.1:1,10.0.0.8:1", "mahavishnu-audit")


class Replica:
    """A gRPC server over TLS answering `Who` with its own address."""

    def __init__(self, host: str, port: int, credentials: grpc.ServerCredentials) -> None:
        self.address = f"{host}:{port}"
        self._credentials = credentials
        self._server: aio.Server | None = None

    async def start(self) -> None:
        def who(_request: bytes, _context: object) -> bytes:
            return self.address.encode()

        server = aio.server()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "probe.Probe",
                    {
                        "Who": grpc.unary_unary_rpc_method_handler(
                            who, request_deserializer=None, response_serializer=None
                        )
                    },
                )
            ]
        )
        assert server.add_secure_port(self.address, self._credentials)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[list[Replica], Path]]:
    state = DevState(tmp_path)
    state.ensure_grpc_tls(("task",))
    credentials = grpc.ssl_server_credentials(
        [(state.grpc_key("task").read_bytes(), state.grpc_cert("task").read_bytes())]
    )
    port = free_port()
    running = [Replica(host, port, credentials) for host in ADDRESSES]
    for replica in running:
        await replica.start()
    yield running, state.grpc_ca
    for replica in running:
        await replica.stop()


async def _who(channel: aio.Channel, calls: int) -> collections.Counter[str]:
    who = channel.unary_unary("/probe.Probe/Who")
    answers: collections.Counter[str] = collections.Counter()
    for _ in range(calls):
        answers[(await who(b"", timeout=5, wait_for_ready=True)).decode()] += 1
    return answers


async def _until_both_answer(channel: aio.Channel) -> None:
    """Wait until the channel is connected to both replicas (within the reconnect backoff)."""
    for _ in range(200):
        if len(await _who(channel, 2)) == 2:
            return
        await asyncio.sleep(0.1)


async def test_calls_take_turns_over_every_replica(
    replicas: tuple[list[Replica], Path],
) -> None:
    running, ca = replicas
    target = "ipv4:" + ",".join(r.address for r in running)
    async with service_channel(Peer(target, channel_credentials(ca), "mahavishnu-task")) as ch:
        await _until_both_answer(ch)
        assert await _who(ch, 20) == {r.address: 10 for r in running}

        # One replica goes away: every call goes to the other, none fails.
        await running[0].stop()
        assert await _who(ch, 10) == {running[1].address: 10}
        # It comes back on the same address and, once the channel has reconnected (backoff
        # of at most 5 s), takes its turns again.
        await running[0].start()
        await _until_both_answer(ch)
        assert await _who(ch, 10) == {r.address: 5 for r in running}


async def test_every_replica_must_carry_the_callee_name(
    replicas: tuple[list[Replica], Path],
) -> None:
    running, ca = replicas
    target = "ipv4:" + ",".join(r.address for r in running)
    # The replicas hold the task service's certificate; a caller expecting the audit service
    # must not talk to them, whichever it picks.
    async with service_channel(Peer(target, channel_credentials(ca), "mahavishnu-audit")) as ch:
        with pytest.raises(aio.AioRpcError) as refused:
            await ch.unary_unary("/probe.Probe/Who")(b"", timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def _serve_peer_probe(keys: Keys, *, max_age: float) -> RunningService:
    """A service on the common runtime whose one method answers with the caller's address."""

    async def caller(_request: bytes, context: grpc.ServicerContext) -> bytes:
        return str(context.peer()).encode()

    def register(server: aio.Server) -> list[str]:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "probe.Probe",
                    {"Caller": grpc.unary_unary_rpc_method_handler(caller)},
                )
            ]
        )
        return ["probe.Probe"]

    definition = ServiceDefinition(
        name="probe",
        grpc_port=0,
        metrics_port=None,
        register=register,
        policies={"/probe.Probe/Caller": MethodPolicy(frozenset({Role.ADMIN}))},
        revocation=anyone_active(),
    )
    settings = CommonSettings(
        auth_jwks_file=keys.jwks,
        grpc_max_connection_age_seconds=max_age,
        shutdown_grace_seconds=0.5,
    )
    service = RunningService(definition, settings)
    await service.start()
    return service


@pytest.mark.parametrize("max_age", [1.0, 0.0])
async def test_servers_close_old_connections_so_clients_resolve_again(
    keys: Keys, max_age: float
) -> None:
    service = await _serve_peer_probe(keys, max_age=max_age)
    metadata = (("authorization", f"Bearer {keys.token(Role.ADMIN)}"),)
    try:
        peer_ = Peer(f"127.0.0.1:{service.grpc_port}", None, "probe")
        async with service_channel(peer_) as channel:
            caller = channel.unary_unary("/probe.Probe/Caller")
            first = await caller(b"", metadata=metadata, timeout=5)
            # Past the age (with gRPC's 10% jitter): new calls go over a new connection.
            await asyncio.sleep(2.0)
            second = await caller(b"", metadata=metadata, timeout=5, wait_for_ready=True)
    finally:
        await service.stop()
    # The client's address: a new connection comes from a new port.
    assert (first != second) is (max_age > 0)
