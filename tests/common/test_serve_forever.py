"""serve_forever: a listener running beside gRPC that dies takes the whole process down."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.harness import Keys

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from mhv_common.config import CommonSettings
    from mhv_common.revocation import Revocation
    from mhv_common.server import ServiceDefinition, serve_forever

    async def active(user):
        return True

    async def listener(stop):
        if sys.argv[2] == "crash":
            await asyncio.sleep(0.5)
            raise RuntimeError("listener lost its socket")
        await stop.wait()

    async def main():
        settings = CommonSettings(auth_jwks_file=Path(sys.argv[1]), shutdown_grace_seconds=1)
        definition = ServiceDefinition(
            name="probe", grpc_port=0, metrics_port=None, register=lambda server: [], policies={},
            revocation=Revocation(active), listeners=[listener],
        )
        if sys.argv[2] == "signal":
            asyncio.get_running_loop().call_later(0.5, lambda: __import__("os").kill(
                __import__("os").getpid(), __import__("signal").SIGTERM))
        await serve_forever(definition, settings)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(("mode", "code"), [("crash", 1), ("signal", 0)])
def test_a_dead_listener_stops_the_service_with_status_1(keys: Keys, mode: str, code: int) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(keys.jwks), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == code, result.stderr[-2000:]
    assert ("a listener stopped unexpectedly" in result.stderr) == (mode == "crash")
    assert "service stopped" in result.stderr
