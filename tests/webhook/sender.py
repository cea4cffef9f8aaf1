"""A load client run as its own process: POSTs one request many times, prints the statuses.

    python -m tests.webhook.sender URL CA_FILE REQUEST_JSON COUNT CONCURRENCY

REQUEST_JSON holds {"headers": {...}, "body_hex": "..."}; the output is one JSON list of
the final status codes (0 for a transport failure). Like a real sender, each request refused
with 503 or 429 and a Retry-After is sent again after that delay (`tests.retrying.post`).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path

import httpx

from tests import retrying


async def _main(
    url: str, ca: str, request: dict[str, object], count: int, concurrency: int
) -> None:
    body = bytes.fromhex(str(request["body_hex"]))
    headers = dict(request["headers"])  # type: ignore[call-overload]
    context = ssl.create_default_context(cafile=ca)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: list[int] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(verify=context, limits=limits, timeout=60) as client:

        async def one() -> None:
            async with gate:
                try:
                    response = await retrying.post(client, url, content=body, headers=headers)
                    statuses.append(response.status_code)
                except httpx.HTTPError as exc:
                    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                    statuses.append(0)

        await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps(statuses))


if __name__ == "__main__":
    url, ca, request_file, count, concurrency = sys.argv[1:6]
    asyncio.run(
        _main(url, ca, json.loads(Path(request_file).read_text()), int(count), int(concurrency))
    )
