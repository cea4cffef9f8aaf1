"""Waiting on a condition instead of sleeping for a guessed time.

A fixed sleep is either too short on a busy machine (the test fails by luck) or too long
everywhere else; a test that waits for what it needs, with a generous deadline, is neither.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Condition = Callable[[], bool] | Callable[[], Awaitable[bool]]


async def wait_until(
    condition: Condition, *, what: str, timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Return as soon as `condition()` holds; fail the test if it does not within `timeout`.

    Args:
        condition: Checked again every `interval` seconds; a plain or an async function.
        what: The awaited state, in words, for the failure message.
        timeout: Seconds to wait at most: generous, since only a failure waits that long.
        interval: Seconds between checks.
    """
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)
