"""Background jobs that run now and then every so often, until the service stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mhv_common import context

logger = logging.getLogger(__name__)


class Periodic:
    """Runs `tick` at start and then every `interval` seconds until `stop` is called.

    Each tick gets its own deadline, so its I/O is bounded like a request's. A tick that fails,
    for whatever reason (the database restarting, a statement cancelled), is logged and the
    schedule goes on: a background job must never die, since a dead worker also turns the
    service's health NOT_SERVING.

    Args:
        interval: Seconds between the end of one tick and the start of the next.
        deadline: Longest a tick may take.
    """

    name = "periodic"

    def __init__(self, *, interval: float, deadline: float = 60.0) -> None:
        self._interval = interval
        self._deadline = deadline
        self._stopping = asyncio.Event()

    async def tick(self) -> None:
        """One unit of work."""
        raise NotImplementedError

    async def run(self) -> None:
        """Tick until `stop`."""
        while not self._stopping.is_set():
            try:
                with context.deadline_scope(self._deadline):
                    await self.tick()
            except Exception as exc:
                logger.warning(
                    "background job failed", extra={"job": self.name, "error": repr(exc)}
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    def stop(self) -> None:
        """Ask `run` to return after the current tick."""
        self._stopping.set()
