"""The gRPC framework's own ceiling on this machine: an empty unary handler on grpc.aio.

    python -m bench._grpc_floor serve PORT [CERT KEY]

Benchmarks drive it with the same client processes as the real service, to show how much of a
service's cost is the framework's. With a certificate and key it serves TLS, like the service.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
from grpc import aio

METHOD = "/mahavishnu.bench.Floor/Empty"


async def serve(port: int, tls: tuple[bytes, bytes] | None = None) -> None:
    async def empty(_request: bytes, _context: aio.ServicerContext) -> bytes:
        return b""

    server = aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "mahavishnu.bench.Floor", {"Empty": grpc.unary_unary_rpc_method_handler(empty)}
            ),
        )
    )
    if tls is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        cert, key = tls
        server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    pair = (
        (Path(sys.argv[3]).read_bytes(), Path(sys.argv[4]).read_bytes()) if sys.argv[4:] else None
    )
    asyncio.run(serve(int(sys.argv[2]), pair))
