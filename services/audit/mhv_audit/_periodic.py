"""Background jobs that run now and then every so often, until the service stops."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


class Periodic:
    """Runs `tick` at start and then every `interval` seconds until `stop` is called.

    A tick that fails is logged and the schedule goes on: a background check must never take
    the service down (a dead worker would also flip the service's health).
    """

    name = "periodic"

    def __init__(self, *, interval: float) -> None:
        self._interval = interval
        self._stopping = asyncio.Event()

    async def tick(self) -> None:
        """One unit of work."""
        raise NotImplementedError

    async def run(self) -> None:
        """Tick until `stop`."""
        while not self._stopping.is_set():
            try:
                await self.tick()
            except Exception as exc:
                logger.warning("%s failed", self.name, extra={"error": repr(exc)})
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            except TimeoutError:
                continue

    def stop(self) -> None:
        """Ask `run` to return after the current tick."""
        self._stopping.set()
