"""A local HTTP server standing in for a remote OpenAI-compatible embeddings API.

This machine cannot reach a real embeddings service, so the remote provider's tests talk to
this stand-in over a real socket. It answers ``POST /v1/embeddings`` the way such APIs do, with
vectors computed by the real local model (so the remote and local providers agree, as they do
when the remote endpoint serves the same model), and fails, stalls or misbehaves on purpose
when a test scripts it to. It is the only stub of the semantic search tests (the provider tests
here, the task service's tests in tests/task/test_semantic_search.py and the model switch in
tests/cli/test_reindex.py); everything else is real.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mhv_task._embedding_local import LocalEmbedder


@dataclass
class Behaviour:
    """What the next requests get. `failures` requests fail with `status` before answers."""

    failures: int = 0
    status: int = 503
    retry_after: str | None = None
    delay: float = 0.0
    dimensions: int | None = None  # answer with vectors of another length
    shuffle: bool = False  # list the vectors in reverse order (their `index` stays right)


@dataclass
class RemoteEmbeddingsStub:
    """The stand-in server: its URL, its script, and what it was asked."""

    url: str
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def remote_embeddings_stub(model: LocalEmbedder) -> AsyncIterator[RemoteEmbeddingsStub]:
    """Serve the stand-in on a free loopback port for the duration of the block."""
    port = _free_port()
    stub = RemoteEmbeddingsStub(url=f"http://127.0.0.1:{port}/v1")

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        stub.requests.append(body)
        stub.headers.append(dict(request.headers))
        script = stub.behaviour
        if script.delay:
            await asyncio.sleep(script.delay)
        if script.failures > 0:
            script.failures -= 1
            headers = {"Retry-After": script.retry_after} if script.retry_after else {}
            return JSONResponse({"error": {"message": "scripted failure"}}, script.status, headers)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = (await model.embed(texts)).vectors
        if script.dimensions is not None:
            vectors = vectors[:, : script.dimensions]
        data = [
            {"object": "embedding", "index": i, "embedding": v.tolist()}
            for i, v in enumerate(vectors)
        ]
        if script.shuffle:
            data.reverse()
        return JSONResponse(
            {"object": "list", "data": data, "model": body["model"], "usage": {"total_tokens": 0}}
        )

    app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="error",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield stub
    finally:
        server.should_exit = True
        await task
        # A request cut off by the graceful-shutdown timeout leaves its connection open.
        for connection in list(server.server_state.connections):
            connection.transport.abort()
        await asyncio.sleep(0)
